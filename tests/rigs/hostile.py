"""Raw-socket clients that misbehave on purpose (trickled, stalled and half-sent requests) for the
receiver's limit tests: real TCP connections to a real receiver."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_answer(raw: bytes) -> Answer:
    """The last HTTP response in `raw` (an interim `100 Continue` before it is skipped)."""
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    return Answer(int(status_line.split()[1]), headers, body)


async def open_upload(
    port: int, path: str, key: str, length: int, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send the head of a POST announcing `length` body bytes, and none of the body yet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-KEY: {key}\r\nContent-Length: {length}\r\n"
        f"{extra}Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def trickle(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, every_s: float, limit_s: float
) -> Answer | None:
    """Send one body byte every `every_s` until the receiver answers (or `limit_s` passes): the answer."""
    deadline = time.monotonic() + limit_s
    reading = asyncio.ensure_future(reader.read())
    try:
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait({reading}, timeout=every_s)
            if done:
                return parse_answer(reading.result())
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                return parse_answer(await asyncio.wait_for(reading, 5))
        return None
    finally:
        reading.cancel()
        writer.close()


@dataclass
class Latencies:
    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        return statistics.quantiles(self.seconds, n=100, method="inclusive")[int(q * 100) - 1]


async def steady_client(url: str, key: str, count: int, pause_s: float = 0.02) -> Latencies:
    """`count` sequential small posts on one connection: each status and latency."""
    out = Latencies()
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            started = time.perf_counter()
            async with session.post(url, data=f'{{"steady":{i}}}'.encode(), headers={"X-API-KEY": key}) as r:
                await r.read()
                out.statuses.append(r.status)
            out.seconds.append(time.perf_counter() - started)
            await asyncio.sleep(pause_s)
    return out
