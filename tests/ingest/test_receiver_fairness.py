"""Fair shares of the in-flight bound: real HTTP, real broker. Bytes:
test_receiver_deadlines."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
from rigs.kafka import read_records, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.records import RawHeaders

PATH = "/server/v4"


async def flood(url: str, key: str, connections: int, until: float, statuses: Counter[int]) -> None:
    """`connections` clients posting back to back until `until` (monotonic)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def client() -> None:
            while time.monotonic() < until:
                async with session.post(url, data=b'{"flood":1}', headers={"X-API-KEY": key}) as response:
                    await response.read()
                    statuses[response.status] += 1

        await asyncio.gather(*(client() for _ in range(connections)))


def test_a_flooding_tenant_cannot_starve_a_quiet_one(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """max_in_flight = 16, tenant acme floods with 64 connections; globex's 120 sequential requests are
    stored at least 95% of the time, acme's excess gets 429 + Retry-After, counted by tenant and reason."""
    settings = make_settings(
        receiver={"port": 0, "operator_port": free_port(), "max_in_flight": 16, "linger_ms": 5}
    )
    base = start_receiver(settings)
    flood_statuses: Counter[int] = Counter()
    quiet_ok: list[str] = []
    quiet_statuses: Counter[int] = Counter()

    async def quiet() -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(120):
                async with session.post(
                    base + PATH, data=f'{{"quiet":{i}}}'.encode(), headers={"X-API-KEY": "wk_globex_1"}
                ) as response:
                    await response.read()
                    quiet_statuses[response.status] += 1
                    if response.status == 200:
                        quiet_ok.append(response.headers["X-Request-Id"])
                    else:
                        assert response.headers["Retry-After"]

    async def run() -> None:
        flooding = asyncio.ensure_future(
            flood(base + PATH, "wk_acme_1", 64, time.monotonic() + 60, flood_statuses)
        )
        await in_flight_reaches(
            settings.receiver.operator_port, 16
        )  # the flood holds every slot before the quiet tenant starts
        await quiet()
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)

    asyncio.run(run())
    assert len(quiet_ok) >= 114, quiet_statuses
    assert flood_statuses[429] > 0 and flood_statuses[200] > 0, flood_statuses
    records = wait_for(
        lambda: [
            r
            for r in read_records(settings, settings.topics.raw("customerglu"))
            if RawHeaders.from_kafka(r.headers).tenant == "globex"
        ]
    )
    assert sorted(RawHeaders.from_kafka(r.headers).request_id for r in records) == sorted(quiet_ok)

    async def metrics() -> str:
        metrics_url = f"http://127.0.0.1:{settings.receiver.operator_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
            return await response.text()

    text = asyncio.run(metrics())
    assert 'headwater_receiver_refusals_total{reason="over_share",tenant="acme"}' in text
    assert 'reason="over_share",tenant="globex"' not in text


def test_a_tenant_alone_may_use_every_slot(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """With no other tenant active, one tenant is never refused for its share: only 200 or 503, never 429."""
    settings = make_settings(receiver={"port": 0, "max_in_flight": 4, "linger_ms": 5})
    base = start_receiver(settings)
    statuses: Counter[int] = Counter()
    asyncio.run(flood(base + PATH, "wk_acme_1", 32, time.monotonic() + 3, statuses))
    assert statuses[200] > 0 and set(statuses) <= {200, 503}, statuses


async def in_flight_reaches(port: int, count: int, timeout: float = 30) -> None:
    """Poll the receiver's in-flight gauge (on its operator port) until it shows at least `count` slots
    held."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            held = [
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("headwater_receiver_in_flight ")
            ]
            if held and held[0] >= count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"in-flight gauge never showed {count}"
            await asyncio.sleep(0.02)
