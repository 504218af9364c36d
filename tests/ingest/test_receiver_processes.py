"""`headwater receiver --processes 2`: one port, two processes, metrics summed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from rigs.kafka import read_records, toml_text, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port


async def fresh_connection(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
    """One request on a new connection (the kernel picks the process per connection)."""
    headers = {"X-API-KEY": "wk_acme_1", "Connection": "close"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.request(method, url, data=body, headers=headers) as response,
    ):
        return response.status, await response.text()


def get(url: str) -> tuple[int, str]:
    try:
        return asyncio.run(fresh_connection(url))
    except aiohttp.ClientError:
        return 0, ""


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, parent pid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def exited(pid: int) -> bool:
    """The process is gone or a zombie. A zombie leader's other threads may still hold its files, its
    sockets too: `listeners` tells when its listening socket is closed."""
    try:
        state = stat_fields(pid)[0]
    except OSError:
        return True
    return state in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(stat_fields(pid)[1])


def listeners(port: int) -> int:
    """The listening TCP sockets on `port` (/proc/net/tcp and tcp6): one per receiver process. A killed
    process can show as a zombie while its other threads still hold its files, its listener too."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                count += 1
    return count


def pids_serving(base: str, tries: int = 200) -> set[int]:
    """The pids answering on the operator port (its /healthz names the process; every receiver process
    listens there as on the public port, SO_REUSEPORT)."""
    pids: set[int] = set()
    for _ in range(tries):
        status, text = get(base + "/healthz")
        if status == 200:
            pids.add(int(re.search(r'"pid":\s*(\d+)', text).group(1)))  # type: ignore[union-attr]
        if len(pids) == 2:
            break
    return pids


@pytest.fixture
def two_processes(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[tuple[Settings, str, str]]:
    settings = make_settings(receiver={"port": free_port(), "operator_port": free_port(), "processes": 2})
    config = tmp_path / "headwater.toml"
    config.write_text(toml_text(settings))
    log = (tmp_path / "receiver.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), "receiver"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{settings.receiver.port}"
    operator = f"http://127.0.0.1:{settings.receiver.operator_port}"
    try:
        wait_for(lambda: get(base + "/readyz")[0] == 200, timeout=60, interval=0.5)
        yield settings, base, operator
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_with_two_processes_killing_one_leaves_the_other_serving(
    two_processes: tuple[Settings, str, str],
) -> None:
    """Both processes answer on the one port; after SIGKILL of one, every new request is answered by the
    other (and stored); the supervisor then starts a replacement; /metrics sums over the processes."""
    settings, base, operator = two_processes
    pids = pids_serving(operator)
    assert len(pids) == 2
    victim, survivor = sorted(pids)
    port = int(base.rpartition(":")[2])
    assert listeners(port) == 2
    before = [
        asyncio.run(fresh_connection(base + "/server/v4", "POST", b'{"n":%d}' % i))[0] for i in range(20)
    ]
    # While one process is alone on the port, no replacement may join it: a listener joining (or leaving) a
    # SO_REUSEPORT group resets the handshakes in flight. So the supervisor is paused until we are done.
    supervisor = parent_of(victim)
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: exited(victim) and listeners(port) == 1, timeout=10
        )  # its listener has left the group
        wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=10)
        after = [
            asyncio.run(fresh_connection(base + "/server/v4", "POST", b'{"after":%d}' % i))[0]
            for i in range(40)
        ]
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert before == [200] * 20 and after == [200] * 40
    records = wait_for(
        lambda: len(r := read_records(settings, settings.topics.raw("customerglu"))) >= 60 and r
    )
    assert len(records) == 60
    replacement = wait_for(
        lambda: (p := pids_serving(operator, tries=50)) - {victim, survivor} and p, timeout=60
    )
    assert survivor in replacement
    text = wait_for(lambda: (m := get(operator + "/metrics"))[0] == 200 and m[1])
    total = sum(
        float(v)
        for v in re.findall(
            r'headwater_receiver_requests_total\{source="customerglu",status="200",tenant="acme"\} (\S+)',
            text,
        )
    )
    assert total == 60, "every process's requests are counted, the killed one's included"
