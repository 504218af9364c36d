"""Light commands stay light: help, kafka, dlq and replay never load Faust."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print("LOADED:" + ",".join(sorted(m for m in ("faust", "mode") if m in sys.modules)))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["kafka", "status", "--help"],
        ["kafka", "up", "--help"],
        ["dlq", "--help"],
        ["dlq", "ls", "--help"],
        ["replay", "--help"],
        ["rewards", "--help"],
        ["worker", "--help"],
    ],
)
def test_a_light_command_does_not_import_faust(args: list[str]) -> None:
    """Loading the CLI and running these commands imports neither faust nor its mode library."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "LOADED:", result.stdout
