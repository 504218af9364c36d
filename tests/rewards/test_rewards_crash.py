"""The dispatcher SIGKILLed between a webhook request and the commit of its outcome.

What the design guarantees: at most one *recorded* success per (tenant, rewardId), and a re-send only
for an attempt whose outcome was not yet durable in Kafka when the process died. Such a re-send is the
same attempt again: same X-Reward-Id, webhook-id, body bytes and X-CG-SIGNATURE, so a receiver that
de-duplicates on X-Reward-Id (docs/sources.md §5: "the receiver's de-duplication key") accepts it once.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rigs.kafka import LoopThread, read_records, wait_for
from rigs.rewards import (
    Dispatcher,
    Seen,
    dead_letters,
    outcomes,
    produce,
    render_toml,
    settings_doc,
    start_customer,
)
from rigs.signing import SW_SECRET

from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.rewards.records import AttemptOutcome, parse_message


def delivered(settings: Settings) -> set[str]:
    """The rewards whose delivered outcome is on rewards.deliveries."""
    found = set()
    for record in read_records(settings, settings.topics.rewards_deliveries):
        message = parse_message(record.value)
        if isinstance(message, AttemptOutcome) and message.verdict == "delivered":
            found.add(message.reward_id)
    return found


def test_sigkill_mid_delivery_resends_only_the_reward_in_flight_with_the_same_idempotency_headers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGKILL while the customer holds the request of reward 6 of 12 (already accepted on its side), then a
    restart: all 12 arrive, only reward 6 is sent twice, both copies identical in ids, body and signature,
    and a receiver de-duplicating on X-Reward-Id accepts every reward exactly once."""
    loop = LoopThread()
    customer = start_customer(loop, {})
    tenants: list[dict[str, Any]] = [
        {
            "id": "crash",
            "rewards_webhook": {
                "url": customer.url("crash"),
                "allow_private_url": True,
                "token": "tok_crash",
                "standard_webhooks_secrets": [SW_SECRET],
                "max_concurrency": 1,
            },
        }
    ]  # one request at a time: request n+1 starts after outcome n is durable
    doc = settings_doc(
        kafka_bootstrap, f"t_rewards_crash_{uuid.uuid4().hex[:8]}", tmp_path / "worker", free_port(), tenants
    )
    settings = Settings.model_validate(doc)
    config = tmp_path / "headwater.toml"
    config.write_text(render_toml(doc))
    accepted: dict[str, Seen] = {}  # the customer's own dedup on X-Reward-Id
    killed: list[str] = []
    first = Dispatcher(config, tmp_path / "first.log", exit_after_s=180)

    def on_request(seen: Seen) -> None:
        accepted.setdefault(seen.reward_id, seen)
        if len(accepted) == 6 and not killed:  # accepted here, but the dispatcher never hears back
            killed.append(seen.reward_id)
            first.process.kill()

    customer.on_request = on_request
    ids = [f"crash-{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    try:
        produce(
            settings,
            [
                (
                    "crash",
                    json.dumps(
                        {
                            "campaignId": "c",
                            "userId": f"u{i}",
                            "rewardId": rid,
                            "rewardName": "ü points",
                            "rewardAmount": i,
                        }
                    ).encode(),
                )
                for i, rid in enumerate(ids)
            ],
        )
        wait_for(lambda: killed, timeout=120)
        first.process.wait(10)
        second = Dispatcher(config, tmp_path / "second.log", exit_after_s=180)
        try:
            wait_for(
                lambda: len(accepted) == 12,
                timeout=150,
                explain=lambda: (
                    f"{len(accepted)} of 12 accepted; the restarted dispatcher logged:\n"
                    + second.output()[-8000:]
                ),
            )
            wait_for(lambda: delivered(settings) >= set(ids), timeout=60)
        finally:
            second.stop()  # a stopped dispatcher sends nothing more: the counts below are final
        requests = {rid: customer.seen("crash", rid) for rid in ids}
        assert set(accepted) == set(ids)
        [in_flight] = killed
        assert {rid: len(r) for rid, r in requests.items()} == {
            rid: 2 if rid == in_flight else 1 for rid in ids
        }
        copy1, copy2 = requests[in_flight]
        for header in ("X-Reward-Id", "webhook-id", "X-CG-SIGNATURE", "X-Reward-Attempt"):
            assert copy1.headers[header] == copy2.headers[header], header
        assert copy1.body == copy2.body
        assert [o.verdict for o in outcomes(settings, in_flight)] == ["delivered"]
        assert all(len(outcomes(settings, rid)) == 1 for rid in ids)  # no attempt was ever made twice
        assert dead_letters(settings) == []
    finally:
        first.stop()
        loop.run(customer.stop())
        loop.close()


def attempt_log(settings: Settings) -> dict[str, list[int]]:
    """Reward -> the attempt numbers recorded on rewards.deliveries, in the order they were written."""
    found: dict[str, list[int]] = {}
    for record in read_records(settings, settings.topics.rewards_deliveries):
        message = parse_message(record.value)
        if isinstance(message, AttemptOutcome):
            found.setdefault(message.reward_id, []).append(message.attempt.number)
    return found


@pytest.mark.slow
def test_sigkill_under_load_resends_only_attempts_in_flight_and_every_reward_is_accepted_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """900 rewards over 3 partitions, 8 requests in flight: SIGKILL after 300 were accepted, then a restart.
    Every reward is accepted once by a receiver de-duplicating on X-Reward-Id, at most the 8 requests in
    flight at the kill are sent again (identical), and no recorded attempt is ever made a second time."""
    loop = LoopThread()
    customer = start_customer(loop, {})
    hook = {"url": customer.url("load"), "allow_private_url": True, "token": "tok_load", "max_concurrency": 8}
    tenants: list[dict[str, Any]] = [{"id": "load", "rewards_webhook": hook}]
    doc = settings_doc(
        kafka_bootstrap, f"t_rewards_load_{uuid.uuid4().hex[:8]}", tmp_path / "worker", free_port(), tenants
    )
    settings = Settings.model_validate(doc)
    config = tmp_path / "headwater.toml"
    config.write_text(render_toml(doc))
    accepted: dict[str, Seen] = {}
    killed: list[bool] = []
    first = Dispatcher(config, tmp_path / "first.log", exit_after_s=180)

    def on_request(seen: Seen) -> None:
        accepted.setdefault(seen.reward_id, seen)
        if len(accepted) >= 300 and not killed:
            killed.append(True)
            first.process.kill()

    customer.on_request = on_request
    ids = [f"load-{i:04d}-{uuid.uuid4().hex[:6]}" for i in range(900)]
    try:
        produce(
            settings,
            [
                ("load", json.dumps({"campaignId": "c", "userId": f"u{i}", "rewardId": rid}).encode())
                for i, rid in enumerate(ids)
            ],
        )
        wait_for(lambda: killed, timeout=120, explain=lambda: first.output()[-4000:])
        first.process.wait(10)
        restarted = time.time()
        second = Dispatcher(config, tmp_path / "second.log", exit_after_s=180)
        try:
            wait_for(
                lambda: len(accepted) == 900,
                timeout=150,
                explain=lambda: f"{len(accepted)} of 900 accepted; restarted:\n" + second.output()[-4000:],
            )
            wait_for(lambda: delivered(settings) >= set(ids), timeout=60)
        finally:
            second.stop()
        requests = {rid: customer.seen("load", rid) for rid in ids}
        resent = {rid: seen for rid, seen in requests.items() if len(seen) > 1}
        assert set(accepted) == set(ids) and all(requests.values())
        assert len(resent) <= 8 and all(len(seen) == 2 for seen in resent.values())
        for copy1, copy2 in resent.values():
            assert copy1.at < restarted < copy2.at  # in flight at the kill, sent again after the restart
            for header in ("X-Reward-Id", "X-CG-SIGNATURE", "X-Reward-Attempt"):
                assert copy1.headers[header] == copy2.headers[header], header
            assert copy1.body == copy2.body
        recorded = attempt_log(settings)
        assert {rid: recorded.get(rid) for rid in ids} == {rid: [1] for rid in ids}  # none recorded twice
        assert dead_letters(settings) == []
    finally:
        first.stop()
        loop.run(customer.stop())
        loop.close()
