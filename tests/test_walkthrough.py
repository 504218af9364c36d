"""The README's "First five minutes" block, run command by command against a receiver and a worker.
Only the config (HEADWATER_CONFIG) and the receiver's address are substituted, as the README says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from rigs.kafka import WorkerProcess, read_records, toml_text, wait_for

from pipeline.config import EXAMPLE_CONFIG, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ADDRESS = "localhost:8080"


def walkthrough_commands(readme: str) -> list[str]:
    """The shell commands of the first ```bash block under "## First five minutes" (continuations joined,
    comments and blank lines left out)."""
    section = readme.split("## First five minutes", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no ```bash block in the First five minutes section"
    commands: list[str] = []
    pending = ""
    for line in block.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(pending.strip())
            pending = ""
    return commands


@dataclass
class Run:
    command: str
    stdout: str
    stderr: str


def test_every_command_of_the_first_five_minutes_runs_and_shows_what_the_readme_says(
    make_settings: Callable[..., Settings],
    start_receiver: Callable[[Settings], str],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    """Each command in the README block succeeds against a live receiver + worker with the shipped
    example's tenants: the event comes out on events.canonical, the bad one is listed and shown as a dead
    letter, its corrected body is redriven under the original headers, and the event comes out."""
    shipped = load_settings(EXAMPLE_CONFIG)
    settings = make_settings(tenants=[t.model_dump(mode="python") for t in shipped.tenants])
    base = start_receiver(settings)
    start_worker(settings)
    config = tmp_path / "walkthrough.toml"
    config.write_text(toml_text(settings))
    shim = tmp_path / "bin" / "headwater"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "HEADWATER_CONFIG": str(config),
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }

    def outcomes() -> int:
        return len(read_records(settings, settings.topics.canonical)) + len(
            read_records(settings, settings.topics.dlq)
        )

    commands = walkthrough_commands((REPO / "README.md").read_text())
    assert any(c.startswith("curl") for c in commands) and any(c.startswith("headwater") for c in commands)
    runs: list[Run] = []
    sent = 0
    for command in commands:
        if command.startswith("headwater"):  # a person gives the worker a second; the test waits for it
            wait_for(lambda: outcomes() >= sent, timeout=90)  # noqa: B023 (called before the loop moves on)
        substituted = command.replace(SHIPPED_ADDRESS, base.removeprefix("http://"))
        done = subprocess.run(
            ["bash", "-c", substituted], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        runs.append(Run(command, done.stdout, done.stderr))
        sent += command.startswith("curl") or (
            command.startswith("headwater dlq redrive") and "--dry-run" not in command
        )

    def outputs(prefix: str) -> list[str]:
        return [run.stdout for run in runs if run.command.startswith(prefix)]

    assert outputs("curl") == ['{"status":"ok"}'] * 2
    first, last = (orjson.loads(out) for out in outputs("headwater tail events.canonical"))
    assert (first["event_id"], first["user_id"], first["tenant"]) == ("evt_2", "usr_502", "demo")
    assert (last["event_id"], last["user_id"], last["tenant"]) == ("evt_3", "usr_503", "demo")
    listed, after = outputs("headwater dlq ls")
    assert "missing_user_identity" in listed and "1 dead letter(s)" in listed
    assert "missing_user_identity" not in after  # redriven: listed with --all only
    [shown, _] = outputs("headwater dlq show")  # the second wrote the stored body to evt_3.json
    assert "missing_user_identity" in shown and '"event_id": "evt_3"' in shown
    assert orjson.loads((tmp_path / "evt_3.json").read_bytes()) == {  # as corrected by the sed line
        "event_id": "evt_3",
        "user_id": "usr_503",
        "event_name": "kyc_completed",
        "timestamp": "2024-03-01T12:10:00Z",
    }
    dry, redriven = outputs("headwater dlq redrive")
    assert "would republish 1 raw record(s)" in dry
    assert "republished 1 raw record(s)" in redriven and "corrected body" in redriven
    [raw] = outputs("headwater tail raw.customerglu")
    records = [orjson.loads(line) for line in raw.splitlines()]
    assert [r["value"].get("user_id") for r in records] == ["usr_502", None, "usr_503"]
    original, fixed = records[1]["headers"], records[2]["headers"]
    assert fixed["hw-redrive-count"] == "1" and fixed["hw-request-id"] == original["hw-request-id"]
    assert fixed["hw-tenant"] == "demo"
