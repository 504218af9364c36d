"""Shared test tools for real-broker tests: a loop thread for servers, polling, reading topics back."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pipeline.config import LocalKafkaSettings, Settings
from pipeline.kafka.local import LocalKafka, free_port


def start_local_broker(data_dir: Path) -> LocalKafka:
    """A LocalKafka on free ports that dies with this process."""
    # 2 GiB of heap: a whole session creates hundreds of topics and some tests write 100k records.
    settings = LocalKafkaSettings(port=free_port(), controller_port=free_port(), data_dir=data_dir, heap="2g")
    broker = LocalKafka(settings)
    broker.up(bound_to_parent=True)
    return broker


def topics_for(prefix: str) -> dict[str, str]:
    """Every topic Headwater writes, under one test's prefix (unique names per test)."""
    return {
        "raw_prefix": f"{prefix}.raw.",
        "canonical": f"{prefix}.canonical",
        "dlq": f"{prefix}.dlq",
        "keyed": f"{prefix}.keyed",
        "replay_results": f"{prefix}.replay-results",
        "rewards": f"{prefix}.rewards",
        "rewards_dlq": f"{prefix}.rewards_dlq",
        "rewards_deliveries": f"{prefix}.deliveries",
    }


class LoopThread:
    """An asyncio loop in a background thread, for servers that tests talk to over real sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30,
    interval: float = 0.2,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll until predicate() is truthy; return its value or fail with a clear message (plus explain())."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"; {explain()}" if explain is not None else ""
            raise AssertionError(f"condition not met within {timeout}s{detail}")
        time.sleep(interval)


def read_records(settings: Settings, topic: str) -> list[Any]:
    """Every committed record of `topic` up to its current end, partition by partition, in offset order.

    Served by the test's TopicWatcher (rigs.watch): one reader kept open, each call reading only what
    arrived since the last, so polling a topic in a wait does not re-read it from the start."""
    from rigs.watch import WATCHERS

    return WATCHERS.records(settings, topic)


def toml_text(settings: Settings) -> str:
    """Settings as a TOML file, secrets included, for the worker subprocesses a test starts."""
    from datetime import timedelta

    from pydantic import SecretStr

    def value(v: Any) -> str:
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, timedelta):
            return repr(v.total_seconds())
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + " }"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    doc = settings.model_dump(mode="python")
    lines: list[str] = []
    for section, body in doc.items():
        if section == "tenants":
            for tenant in body:
                lines.append("[[tenants]]")
                lines += [f"{k} = {value(v)}" for k, v in tenant.items() if v is not None]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"


def die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the test process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class HeadwaterProcess:
    """`headwater ARGS...` in a subprocess, its output in a log file; it dies with the test process."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        stop_timeout_s: float = 30,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: variables set on top of this process's environment."""
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.stop_timeout_s = stop_timeout_s
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            env={**os.environ, **env} if env else None,
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it takes longer than stop_timeout_s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class WorkerProcess(HeadwaterProcess):
    """`headwater worker` on a config written from Settings."""

    def __init__(self, settings: Settings, config_path: Path, *args: str) -> None:
        self.data_dir = settings.worker.data_dir
        config_path.write_text(toml_text(settings))
        log_path = config_path.with_suffix(f".{time.monotonic_ns()}.log")
        super().__init__(["--config", str(config_path), "worker", *args], log_path)


def produce_raw(
    settings: Settings,
    source: str,
    bodies: list[bytes],
    tenant: str = "acme",
    partition: int | None = None,
    **header_fields: Any,
) -> None:
    """Write raw records as the receiver would (same headers), straight to raw.<source>."""
    from pipeline.kafka.clients import ensure_topics, make_producer
    from pipeline.records import RawHeaders, new_request_id, utc_now

    async def run() -> None:
        await ensure_topics(settings, [settings.topics.raw(source)])
        producer = make_producer(settings, linger_ms=20)
        await producer.start()
        try:
            acks = []
            for body in bodies:
                headers = RawHeaders(
                    tenant=tenant,
                    source=source,
                    received_at=utc_now(),
                    request_id=new_request_id(),
                    content_type="application/json",
                    **header_fields,
                )
                acks.append(
                    await producer.send(
                        settings.topics.raw(source), body, partition=partition, headers=headers.to_kafka()
                    )
                )
            await asyncio.gather(*acks)
        finally:
            await producer.stop()

    asyncio.run(run())
