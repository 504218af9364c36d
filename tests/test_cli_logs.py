"""Quiet, useful logs: a normal start says what listens where and which config, then only
warnings; no ERROR line; routine aiokafka retries at DEBUG; --log-format json gives one object a line."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError
from rigs.kafka import read_records, toml_text, wait_for

from pipeline import logs
from pipeline.config import Settings
from pipeline.kafka.local import free_port

REPO = Path(__file__).resolve().parents[1]
KEY = {"X-API-KEY": "wk_acme_1", "Content-Type": "application/json"}
EVENT = orjson.dumps(
    {
        "event_id": "evt_log_1",
        "event_name": "kyc_completed",
        "user_id": "u_1",
        "timestamp": "2024-03-01T12:00:00Z",
    }
)
COORDINATOR = logging.getLogger("aiokafka.consumer.group_coordinator")


# --- the logging module ----------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """What Headwater's handler writes, for one test; the root logger's level is restored afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    yield stream
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "headwater"]
    root.setLevel(level)


def test_a_retriable_coordinator_error_is_debug_and_a_fatal_one_stays_an_error(captured: io.StringIO) -> None:
    """aiokafka's "Group Coordinator Request failed" for a retriable error (the coordinator is still
    starting) is hidden at info and shown as DEBUG at debug; a non-retriable one keeps ERROR."""
    logs.configure("info", stream=captured)
    COORDINATOR.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    COORDINATOR.warning("Heartbeat failed for group %s because it is rebalancing", "g")
    assert captured.getvalue() == ""
    COORDINATOR.error("Group Coordinator Request failed: %s", GroupAuthorizationFailedError())
    assert (
        " ERROR aiokafka.consumer.group_coordinator: Group Coordinator Request failed" in captured.getvalue()
    )

    debug = io.StringIO()
    logs.configure("debug", stream=debug)
    COORDINATOR.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    assert " DEBUG aiokafka.consumer.group_coordinator: Group Coordinator Request failed" in debug.getvalue()


def test_headwater_logs_at_its_level_and_libraries_only_warn_unless_debug(captured: io.StringIO) -> None:
    """At info our INFO lines show and Faust's do not; at warning ours are hidden too; at debug all show."""
    logs.configure("info", stream=captured)
    logging.getLogger("pipeline.ingest.receiver").info("ours")
    logging.getLogger("faust.worker").info("theirs")
    logging.getLogger("mode.services").warning("their warning")
    assert [line.split(": ", 1)[1] for line in captured.getvalue().splitlines()] == ["ours", "their warning"]
    quiet = io.StringIO()
    logs.configure("warning", stream=quiet)
    logging.getLogger("pipeline.ingest.receiver").info("ours")
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    logs.configure("debug", stream=loud)
    logging.getLogger("faust.worker").debug("theirs")
    assert "theirs" in loud.getvalue()


def test_json_format_is_one_object_a_line_with_the_traceback_inside(captured: io.StringIO) -> None:
    """--log-format json writes one JSON object per line: time, level, logger, message (+ exception)."""
    logs.configure("info", "json", stream=captured)
    log = logging.getLogger("pipeline.test")
    log.info("hello %s", "world")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = (orjson.loads(line) for line in captured.getvalue().splitlines())
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "pipeline.test", "hello world")
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


# --- real processes --------------------------------------------------------------------------------------


class Service:
    """A `headwater ...` subprocess started in an empty directory, stdout and stderr in one log file."""

    def __init__(self, workdir: Path, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = workdir / f"{args[0]}-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "--config", str(config), *args],
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            assert self.process.poll() is None, f"exited early:\n{self.output()}"
            return text in self.output()

        wait_for(seen, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Any]:
    """Start Services in an empty temp dir that holds only their config; all stopped after the test."""
    workdir = tmp_path / "empty"
    workdir.mkdir()
    started: list[Service] = []

    def start(settings: Settings, *args: str, env: dict[str, str] | None = None) -> Service:
        config = workdir / "headwater.toml"
        config.write_text(toml_text(settings))
        service = Service(workdir, config, *args, env=env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def on_ports(make_settings: Any, tmp_path: Path) -> Settings:
    """Settings with real loopback ports for the receiver, the worker's /metrics and the dispatcher."""
    return make_settings(
        receiver={"port": free_port()},
        worker={"web_port": free_port(), "data_dir": str(tmp_path / "empty" / "worker")},
        rewards={"web_port": free_port()},
    )


def send_and_see_it_come_out(settings: Settings) -> None:
    """POST one event to the receiver and wait for its canonical event: proof the start is complete."""

    async def post() -> int:
        url = f"http://127.0.0.1:{settings.receiver.port}/server/v4"
        async with aiohttp.ClientSession() as session, session.post(url, headers=KEY, data=EVENT) as response:
            return response.status

    assert asyncio.run(post()) == 200
    wait_for(lambda: read_records(settings, settings.topics.canonical), timeout=90)


def assert_quiet(output: str, most_lines: int) -> None:
    """No ERROR, no traceback, and only a few lines."""
    lines = output.splitlines()
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], output
    assert len(lines) <= most_lines, output


def test_receiver_and_worker_start_with_a_few_lines_and_no_error(
    make_settings: Any, tmp_path: Path, services: Any
) -> None:
    """`headwater receiver` and `headwater worker`, from an empty directory with only their config, say
    which config and where they listen, process an event, and log no ERROR or traceback on the way."""
    settings = on_ports(make_settings, tmp_path)
    receiver = services(settings, "receiver")
    worker = services(settings, "worker")
    receiver.wait_for_line(f"receiver listening on http://127.0.0.1:{settings.receiver.port}")
    worker.wait_for_line(f"worker listening on http://127.0.0.1:{settings.worker.web_port}")
    send_and_see_it_come_out(settings)
    assert (receiver.stop(), worker.stop()) == (0, 0)
    for service in (receiver, worker):
        assert "config " in service.output() and "headwater.toml" in service.output()
        assert_quiet(service.output(), most_lines=6)


def test_json_logs_are_one_object_a_line_from_a_real_process(
    make_settings: Any, tmp_path: Path, services: Any
) -> None:
    """With HEADWATER_LOG_FORMAT=json (or --log-format json) every line a service writes is a JSON object."""
    settings = on_ports(make_settings, tmp_path)
    receiver = services(settings, "receiver", env={"HEADWATER_LOG_FORMAT": "json"})
    worker = services(settings, "--log-format", "json", "worker")
    receiver.wait_for_line("receiver listening on")
    worker.wait_for_line("worker listening on")
    send_and_see_it_come_out(settings)
    receiver.stop(), worker.stop()
    for service in (receiver, worker):
        docs = [orjson.loads(line) for line in service.output().splitlines()]
        assert docs and all(set(doc) >= {"time", "level", "logger", "message"} for doc in docs)
        assert not [doc for doc in docs if doc["level"] == "ERROR"]


def test_up_without_local_kafka_starts_quietly(make_settings: Any, tmp_path: Path, services: Any) -> None:
    """`headwater up` with local_kafka disabled, on the test broker: the receiver, a worker and the reward
    dispatcher start, an event goes through, and the whole output has no ERROR or traceback."""
    settings = on_ports(make_settings, tmp_path)
    up = services(settings, "up")
    up.wait_for_line("receiver listening on")
    up.wait_for_line("worker listening on")
    up.wait_for_line("ready in ")
    up.wait_for_line("rewards dispatcher listening on")  # `ready` does not wait for the dispatcher
    send_and_see_it_come_out(settings)
    assert up.stop(signal.SIGINT) == 0
    assert "up: config " in up.output()
    assert_quiet(up.output(), most_lines=12)


def test_every_routine_retry_template_is_one_aiokafka_really_logs() -> None:
    """The messages moved to DEBUG are aiokafka's own templates, word for word, so an upgrade that rewords
    them shows up here instead of as ERROR lines on a normal start."""
    import inspect

    from aiokafka.consumer import group_coordinator

    source = inspect.getsource(group_coordinator)
    for logger, template in logs.ROUTINE_RETRIES:
        assert logger == group_coordinator.__name__
        assert f'"{template}"' in source, template


def test_a_request_aiohttp_cannot_parse_is_logged_at_debug_not_error() -> None:
    """A sender's malformed HTTP (aiohttp answers it 400) is not an error of ours: DEBUG, hidden by default;
    any other aiohttp.server error keeps its level."""
    from aiohttp.http_exceptions import BadHttpMessage

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            (type(exc), exc, None),
        )

    quiet, shown = logs.RoutineRetriesToDebug(show_debug=False), logs.RoutineRetriesToDebug(show_debug=True)
    malformed = record(BadHttpMessage("Invalid header token"))
    assert quiet.filter(malformed) is False and malformed.levelname == "DEBUG"
    assert shown.filter(record(BadHttpMessage("Invalid header token"))) is True
    ours = record(RuntimeError("a bug in a handler"))
    assert quiet.filter(ours) is True and ours.levelname == "ERROR"
