"""POST /rewards/v1 takes its own credential and stores a request's rewards all or none.

Real HTTP against a Receiver, real broker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from rigs.kafka import read_records, start_local_broker, wait_for

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.records import RawHeaders


def reward(**fields: Any) -> dict[str, Any]:
    return {"campaignId": "c-1", "userId": "u-1", "rewardId": f"r-{uuid.uuid4()}", **fields}


async def post(url: str, body: bytes, key: str | None) -> tuple[int, CIMultiDict[str], Any]:
    headers = {"Content-Type": "application/json", **({"X-API-KEY": key} if key is not None else {})}
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, CIMultiDict(response.headers), await response.json(content_type=None)


def send(
    base: str, doc: Any, key: str | None, path: str = "/rewards/v1"
) -> tuple[int, CIMultiDict[str], Any]:
    return asyncio.run(post(base + path, json.dumps(doc).encode(), key))


def test_only_a_rewards_key_opens_the_reward_intake(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """A rewards key gets 200 and its rewards are stored for its tenant; a vendor write key, an unknown
    key, no key, and any key of a tenant without rewards keys get 401; a rewards key opens no vendor route."""
    settings = make_settings(
        tenants=[
            {"id": "acme", "write_keys": ["wk_acme_1"], "rewards_keys": ["rk_acme_1", "rk_acme_2"]},
            {"id": "plain", "write_keys": ["wk_plain_1"]},
        ]
    )
    base = start_receiver(settings)
    for key in ("wk_acme_1", "wk_plain_1", "rk_nope", "", None, "rk_acme_1x"):
        status, _, answer = send(base, reward(), key)
        assert (status, answer["status"]) == (401, "error"), key
    assert send(base, {"event_name": "x"}, "rk_acme_1", path="/server/v4")[0] == 401
    first, second = reward(), reward()
    assert send(base, first, "rk_acme_1")[:1] == (200,)
    assert send(base, second, "rk_acme_2")[0] == 200
    records = wait_for(lambda: len(r := read_records(settings, settings.topics.rewards)) == 2 and r)
    assert sorted(json.loads(r.value)["rewardId"] for r in records) == sorted(
        [first["rewardId"], second["rewardId"]]
    )
    assert {RawHeaders.from_kafka(r.headers).tenant for r in records} == {"acme"}


@pytest.mark.parametrize(
    "tenants",
    [
        [{"id": "a", "write_keys": ["k1"], "rewards_keys": ["k1"]}],
        [{"id": "a", "write_keys": ["k1"]}, {"id": "b", "rewards_keys": ["k1"]}],
        [{"id": "a", "rewards_keys": ["k2"]}, {"id": "b", "rewards_keys": ["k2"]}],
    ],
)
def test_a_rewards_key_is_never_also_a_write_key_or_shared(
    make_settings: Callable[..., Settings], tenants: list[dict[str, Any]]
) -> None:
    """The credential-uniqueness check covers rewards keys: shared with a write key or another tenant
    fails."""
    with pytest.raises((ConfigError, ValueError), match="rewards key|shared"):
        make_settings(tenants=tenants)


def test_an_array_larger_than_the_free_slots_is_stored_whole_in_one_batch(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """With max_in_flight = 1, an array of 300 rewards is one write: 200, and all 300 are stored, in order,
    at consecutive offsets of one partition (one record batch, which the broker appends whole or not at
    all)."""
    settings = make_settings(receiver={"port": 0, "max_in_flight": 1})
    base = start_receiver(settings)
    rewards = [reward(n=n) for n in range(300)]
    status, headers, answer = send(base, rewards, "rk_acme_1")
    assert (status, answer["count"]) == (200, 300)
    records = wait_for(lambda: len(r := read_records(settings, settings.topics.rewards)) == 300 and r)
    assert [json.loads(r.value)["rewardId"] for r in records] == [r["rewardId"] for r in rewards]
    assert len({r.partition for r in records}) == 1
    offsets = [r.offset for r in records]
    assert offsets == list(range(offsets[0], offsets[0] + 300))
    assert {RawHeaders.from_kafka(r.headers).request_id for r in records} == {headers["X-Request-Id"]}


def test_during_an_outage_an_array_gets_503_and_none_of_it_is_stored(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str], tmp_path: Path
) -> None:
    """Kafka down: the array gets 503 + Retry-After and, once Kafka is back, none of its rewards appears
    (the batch expired in the producer rather than going out late); the retry then stores all of it."""
    broker = start_local_broker(tmp_path / "outage-kafka")
    try:
        settings = make_settings(
            kafka={"bootstrap_servers": broker.bootstrap, "partitions": 1},
            receiver={"port": 0, "ack_timeout_s": 2.0},
        )
        base = start_receiver(settings)
        assert send(base, [reward(), reward()], "rk_acme_1")[0] == 200
        broker.down()
        during = [reward(n=n) for n in range(20)]
        status, headers, _ = send(base, during, "rk_acme_1")
        assert status == 503 and int(headers["Retry-After"]) >= 1
        broker.up(bound_to_parent=True)
        marker = reward()
        wait_for(lambda: send(base, marker, "rk_acme_1")[0] == 200, timeout=60, interval=1)
        ids = [json.loads(r.value)["rewardId"] for r in read_records(settings, settings.topics.rewards)]
        assert marker["rewardId"] in ids and len(ids) == 3
        assert not {r["rewardId"] for r in during} & set(ids)
        assert send(base, during, "rk_acme_1")[0] == 200
        ids = wait_for(
            lambda: (
                len(
                    i := [
                        json.loads(r.value)["rewardId"]
                        for r in read_records(settings, settings.topics.rewards)
                    ]
                )
                == 23
                and i
            )
        )
        assert ids[-20:] == [r["rewardId"] for r in during]
    finally:
        broker.down()
