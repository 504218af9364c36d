"""What a sender wrote is shown, never obeyed: `dlq show` escapes control characters of a body, a header or
a message, and text logs keep outside text on one line."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from click.testing import CliRunner
from rigs.dlq import config_file, letter, put

from pipeline import logs
from pipeline.cli import main
from pipeline.config import Settings
from pipeline.printable import printable

ATTACK = "\x1b]0;owned\x07\x1b[2J\x9b31mfake line\r\nreal?"


def test_printable_escapes_c0_c1_and_del_but_keeps_text() -> None:
    """ESC, BEL, CR, DEL and the C1 controls become visible escapes; letters, tabs and non-ASCII stay."""
    assert printable("a\x1bb\x07c\x7fd\x9be\tf é") == "a\\x1bb\\x07c\\x7fd\\x9be\tf é"
    assert printable("one\ntwo") == "one\\x0atwo"
    assert printable("one\ntwo", keep_newlines=True) == "one\ntwo"


def test_dlq_show_prints_a_hostile_body_escaped(settings: Settings, tmp_path: Path) -> None:
    """A body with an OSC title, a screen clear, a C1 CSI and a CR reaches the terminal as text."""
    hostile = letter(
        settings, "customerglu", reason="invalid_json", stage="parse", index=None, body=ATTACK.encode()
    )
    put(settings, [hostile])
    config = config_file(settings, tmp_path)
    shown = CliRunner().invoke(
        main, ["--config", str(config), "dlq", "show", hostile.id], catch_exceptions=False
    )
    assert shown.exit_code == 0
    assert "\x1b" not in shown.stdout and "\x9b" not in shown.stdout and "\x07" not in shown.stdout
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31mfake line" in shown.stdout


def test_dlq_show_body_to_a_file_keeps_the_exact_bytes(settings: Settings, tmp_path: Path) -> None:
    """`--body` into a pipe or a file is the stored request byte for byte (it is sent back corrected)."""
    hostile = letter(
        settings, "customerglu", reason="invalid_json", stage="parse", index=None, body=ATTACK.encode()
    )
    put(settings, [hostile])
    config = config_file(settings, tmp_path)
    shown = CliRunner().invoke(
        main, ["--config", str(config), "dlq", "show", hostile.id, "--body"], catch_exceptions=False
    )
    assert shown.stdout_bytes == ATTACK.encode()


def test_a_text_log_line_cannot_be_split_by_outside_text() -> None:
    """A tenant endpoint's response with newlines and ESC stays on the one line the process wrote."""
    stream = io.StringIO()
    logs.configure("info", "text", stream=stream)
    try:
        logging.getLogger("pipeline.test").warning(
            "endpoint answered: %s", "ok\n2026-01-01 ERROR forged\x1b[2J"
        )
    finally:
        logs.configure("info", "text")
    written = stream.getvalue()
    assert written.count("\n") == 1
    assert "\x1b" not in written and "forged\\x1b[2J" in written
