"""Item limits, checked while scanning before any per-item work: batched sources (receiver.max_items) and
/rewards/v1 (receiver.max_rewards), 413 with the limit; reward elements stored as the sender's exact bytes.
Real HTTP against a Receiver, real broker."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import Callable

import aiohttp
import pytest
from rigs.hostile import steady_client
from rigs.kafka import read_records, wait_for

from pipeline.config import Settings
from pipeline.ingest.jsonspan import TooManyItems, array_elements, check_item_count

LIMIT = 50
SHAPES = {  # route -> body of n items in that source's batch shape
    "/segment/v4": lambda n: json.dumps([{"type": "track", "event": "e"}] * n),
    "/segment/v4 batch": lambda n: json.dumps({"batch": [{"type": "track"}] * n, "sentAt": "x"}),
    "/v3/moengage": lambda n: json.dumps({"app_name": "a", "events": [{"event_name": "e"}] * n}),
    "/clevertap/v4": lambda n: json.dumps({"targetId": 1, "profiles": [{"identity": "u"}] * n}),
    "/api/v1/s2s/event": lambda n: json.dumps([{"event_type": "e"}] * n),
}
HEADERS = {"/api/v1/s2s/event": {"X-Auth-Token": "ak_acme.st_acme"}}


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, await response.read()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_batched_body_over_max_items_gets_413_naming_the_limit(
    shape: str, make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """max_items = 50: 50 items are stored (200); 51 get 413 with the limit in the message, store nothing."""
    settings = make_settings(receiver={"port": 0, "max_items": LIMIT})
    base = start_receiver(settings)
    path = shape.split()[0]
    headers = HEADERS.get(path, {"X-API-KEY": "wk_acme_1"})
    at_limit = asyncio.run(post(base + path, SHAPES[shape](LIMIT).encode(), headers))
    over = asyncio.run(post(base + path, SHAPES[shape](LIMIT + 1).encode(), headers))
    assert at_limit[0] == 200, at_limit
    assert over[0] == 413 and f"receiver.max_items = {LIMIT}" in json.loads(over[1])["error"], over
    source = {
        "/segment/v4": "segment",
        "/v3/moengage": "moengage",
        "/clevertap/v4": "clevertap",
        "/api/v1/s2s/event": "usermaven",
    }[path]
    records = wait_for(lambda: read_records(settings, settings.topics.raw(source)))
    assert [r.value for r in records] == [SHAPES[shape](LIMIT).encode()]


def test_reward_elements_are_stored_as_the_senders_exact_bytes(
    settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """Whitespace, key order and number spelling of each element are kept: no re-encoding."""
    base = start_receiver(settings)
    elements = [
        b'{ "rewardId" : "r-1", "userId":"u", "campaignId":"c", "rewardAmount": 1.50 }',
        b'{"campaignId":"c","userId":"u","rewardId":"r-2","details":{"a":[1, 2]}}',
        b'{"campaignId":"c"}',
    ]
    body = b"[\n  " + b" ,\n  ".join(elements) + b"\n]"
    status, answer = asyncio.run(post(base + "/rewards/v1", body, {"X-API-KEY": "rk_acme_1"}))
    assert status == 200, answer
    assert json.loads(answer) == {
        "status": "ok",
        "count": 3,
        "invalid": [{"index": 2, "reason": "missing_field:userId"}],
    }
    records = wait_for(lambda: len(r := read_records(settings, settings.topics.rewards)) == 3 and r)
    assert [r.value for r in records] == elements


def test_a_megabyte_of_empty_reward_objects_is_refused_at_once_in_little_memory(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """A 1 MiB body `[{},{},...]` (~350,000 elements) to /rewards/v1: 413 naming max_rewards, in well under a
    second, and the receiver's Python heap grows by less than 8 MiB over the body (traced)."""
    settings = make_settings(receiver={"port": 0, "max_body_bytes": 2_097_152})
    base = start_receiver(settings)
    body = b"[" + b"{}," * 349_525 + b"{}]"
    tracemalloc.start()
    try:
        started = time.monotonic()
        status, answer = asyncio.run(post(base + "/rewards/v1", body, {"X-API-KEY": "rk_acme_1"}))
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"1 MiB of empty reward objects: 413 in {seconds * 1000:.0f} ms,"
        f" traced heap peak {peak / 1_048_576:.1f} MiB"
    )
    assert status == 413 and "receiver.max_rewards = 1000" in json.loads(answer)["error"], answer
    assert seconds < 1.0, seconds
    assert peak < 3 * len(body) + 8 * 1_048_576, peak  # the client's copy, the receiver's, and the scan


def test_scanning_a_hostile_body_does_not_hold_other_tenants(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """acme posts 4 MiB segment bodies of one item holding ~1.4 M nested empty arrays (a slow scan: the
    commas must be walked); globex's sequential requests meanwhile keep a p99 under 0.5 s."""
    settings = make_settings(receiver={"port": 0})
    base = start_receiver(settings)
    hostile = b"[[" + b"[]," * 1_400_000 + b"[]]]"

    async def attack() -> list[int]:
        statuses = []
        for _ in range(2):
            status, _ = await post(base + "/segment/v4", hostile, {"X-API-KEY": "wk_acme_1"})
            statuses.append(status)
        return statuses

    async def run() -> tuple[list[int], list[int], float]:
        attacking = asyncio.ensure_future(attack())
        steady = await steady_client(base + "/server/v4", "wk_globex_1", 80)
        return await attacking, steady.statuses, steady.quantile(0.99)

    attacked, statuses, p99 = asyncio.run(run())
    assert attacked == [200, 200]  # one item: stored, the worker dead-letters it as one
    assert statuses == [200] * 80
    assert p99 < 0.5, p99


@pytest.mark.parametrize(
    ("body", "elements"),
    [
        (b"[]", []),
        (b' [ 1 , "a,]" ,{"b":[1,2]} ] ', [b"1", b'"a,]"', b'{"b":[1,2]}']),
        (b'["\\"]", 2]', [b'"\\"]"', b"2"]),
        (b"{}", None),
        (b"[1,", None),
        (b"[1]]", None),
        (b'["open]', None),
        (b"[" * 2000 + b"]" * 2000, None),
    ],
)
def test_array_elements_are_cut_as_their_exact_bytes(body: bytes, elements: list[bytes] | None) -> None:
    assert array_elements(body, 10) == elements


def test_item_counting_stops_past_the_limit_and_counts_the_batch_shapes() -> None:
    check_item_count(b"[" + b"0," * 9 + b"0]", 10)
    check_item_count(b'{"events":[' + b"[1,2,3]," * 9 + b"0]}", 10)  # commas inside items do not count
    for over in (b"[" + b"0," * 10 + b"0]", b'{"a":[0,0,0,0,0,0],"events":[0,0,0,0,0]}'):
        with pytest.raises(TooManyItems):
            check_item_count(over, 10)
    started = time.perf_counter()
    with pytest.raises(TooManyItems):
        check_item_count(b"[" + b"0," * 2_600_000 + b"0]", 10_000)
    assert time.perf_counter() - started < 0.2
