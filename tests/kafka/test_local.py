"""The local broker's set-up steps that do not need a broker (pipeline.kafka.local)."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.config import LocalKafkaSettings
from pipeline.errors import LocalKafkaError
from pipeline.kafka import local


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random id whose text would start with '-' is drawn again: StorageTool reads '-...' as an option
    ("--cluster-id expected one argument"), which once failed a fresh `kafka up`."""
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" + bytes(15))])
    monkeypatch.setattr(local.uuid, "uuid4", lambda: next(draws))
    cluster_id = local.new_cluster_id()
    assert cluster_id == "EAAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22


def test_a_controller_port_is_chosen_beside_a_taken_one(tmp_path: Path) -> None:
    """With controller_port 0 the broker port + 1 is used when free; when something holds it, another
    free port is chosen, so two local brokers (or a broker and anything on 9093) run side by side."""
    port = local.free_port()
    broker = local.LocalKafka(LocalKafkaSettings(port=port, data_dir=tmp_path))
    chosen = broker.controller_port()
    if chosen == port + 1:  # port + 1 was free: hold it and ask again
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", port + 1))
            holder.listen()
            chosen = broker.controller_port()
    assert chosen not in (0, port, port + 1)


def test_a_taken_controller_port_that_was_asked_for_is_named(tmp_path: Path) -> None:
    """An explicit local_kafka.controller_port that something listens on is refused with the key's name."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        broker = local.LocalKafka(
            LocalKafkaSettings(port=local.free_port(), controller_port=taken, data_dir=tmp_path)
        )
        with pytest.raises(
            LocalKafkaError, match=rf"controller port {taken} is taken.*local_kafka\.controller_port"
        ):
            broker.controller_port()


def test_kafka_up_beside_a_taken_controller_port_says_which_it_chose(tmp_path: Path) -> None:
    """`headwater kafka up --port P` with P + 1 held by another program starts anyway; up and status name
    the controller port it chose."""
    port = local.free_port()
    cli = [sys.executable, "-m", "pipeline.cli", "kafka"]
    where = ["--port", str(port), "--data-dir", str(tmp_path / "kafka")]
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # if P + 1 is taken already, that is the case under test too
            holder.bind(("127.0.0.1", port + 1))
            holder.listen()
        try:
            started = subprocess.run([*cli, "up", *where], capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stderr
            match = re.search(
                r"running \(pid \d+\) on 127\.0\.0\.1:(\d+), controller on 127\.0\.0\.1:(\d+)", started.stdout
            )
            assert match, started.stdout
            assert int(match.group(1)) == port and int(match.group(2)) not in (port, port + 1)
            status = subprocess.run([*cli, "status", *where], capture_output=True, text=True, timeout=60)
            assert status.returncode == 0
            assert f"on 127.0.0.1:{port}, controller on 127.0.0.1:{match.group(2)}" in status.stdout
        finally:
            subprocess.run([*cli, "down", *where], capture_output=True, timeout=60)
