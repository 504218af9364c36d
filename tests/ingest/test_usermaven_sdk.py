"""A request as Usermaven's JavaScript SDK sends it, through the receiver and a worker: the key it was
configured with is both `?token=` and the body's `api_key` (docs/senders.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import orjson
from rigs.kafka import WorkerProcess, read_records, wait_for

from pipeline.config import Settings


def sdk_event(api_key: str, event_id: str) -> dict[str, object]:
    """The SDK's event shape: src "usermaven", a 10-character event_id, utc_time, namespace."""
    return {
        "api_key": api_key, "src": "usermaven", "event_type": "signed_up", "event_id": event_id,
        "namespace": "usermaven", "utc_time": "2024-03-01T12:00:00.123Z", "local_tz_offset": -60,
        "user": {"id": "u_9", "anonymous_id": "3hd8s0a1lq"}, "ids": {}, "event_attributes": {"plan": "pro"},
    }  # fmt: skip


async def post(url: str, token: str, body: bytes) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, params={"token": token}, data=body, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        return response.status


def test_the_whole_token_in_the_body_is_canonical_and_another_is_a_mismatch(
    settings: Settings,
    start_receiver: Callable[[Settings], str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A body api_key equal to the request's whole API_KEY.SERVER_TOKEN comes out canonical; the same
    key with another server part is dead-lettered api_key_mismatch (the record stores only the token's
    digest, and the comparison works from it)."""
    base = start_receiver(settings)
    start_worker(settings, "--source", "usermaven")
    url = f"{base}/api/v1/s2s/event"
    good = orjson.dumps([sdk_event("ak_acme.st_acme", "k2h4d9x1qz")])
    forged = orjson.dumps([sdk_event("ak_acme.st_forged", "p0w8e7r6t5")])
    assert asyncio.run(post(url, "ak_acme.st_acme", good)) == 200
    assert asyncio.run(post(url, "ak_acme.st_acme", b"\xef\xbb\xbf" + forged)) == 200  # a BOM is ignored too
    [event] = wait_for(lambda: read_records(settings, settings.topics.canonical), timeout=60)
    doc = orjson.loads(event.value)
    assert (doc["event_id"], doc["tenant"], doc["event_id_derived"]) == ("k2h4d9x1qz", "acme", False)
    [letter] = wait_for(lambda: read_records(settings, settings.topics.dlq), timeout=60)
    assert orjson.loads(letter.value)["reason"] == "api_key_mismatch"
