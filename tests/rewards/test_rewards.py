"""Reward webhooks out (docs/sources.md §5): validation and retry policy by value, then the dispatcher
end to end with a real broker, a real `headwater rewards run` subprocess and a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from rigs.kafka import LoopThread, wait_for
from rigs.rewards import (
    Customer,
    Dispatcher,
    dead_letters,
    outcomes,
    produce,
    render_toml,
    settings_doc,
    start_customer,
)
from rigs.signing import (
    SW_SECRET,
    UNICODE_REWARD,
    WORKED_BODY,
    WORKED_DIGEST,
    WORKED_TOKEN,
    python_reserialized,
)

import headwater
from pipeline.cli import main
from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.reasons import REWARD_CATALOGUE
from pipeline.rewards.breaker import Breaker
from pipeline.rewards.records import (
    RewardRejected,
    classify,
    parse_retry_after,
    parse_reward,
    retry_delay_s,
    split_rewards,
    validate_reward,
)
from pipeline.rewards.sender import webhook_id
from pipeline.signing import cg_signature

SW_SECRET_2 = "whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA=="


def reward(reward_id: str | None = None, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "campaignId": "5d1c7e2a-0b3f-4c6d-9a8e-7f1b2c3d4e5f",
        "type": "direct",
        "userId": "usr_1",
        "rewardId": reward_id or f"r-{uuid.uuid4()}",
        "rewardName": "50 Points",
        "rewardAmount": 50,
    }
    doc.update(fields)
    return doc


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# --- pure: validation and policy ----------------------------------------------------------------------


class TestValidation:
    @pytest.mark.parametrize(
        ("doc", "reason"),
        [
            ([reward()], "not_an_object"),
            ("x", "not_an_object"),
            ({**reward(), "rewardId": None}, "missing_field:rewardId"),
            ({k: v for k, v in reward().items() if k != "userId"}, "missing_field:userId"),
            ({**reward(), "campaignId": "  "}, "missing_field:campaignId"),
            ({**reward(), "userId": 42}, "wrong_type:userId"),
            ({**reward(), "rewardAmount": "50"}, "wrong_type:rewardAmount"),
            ({**reward(), "rewardAmount": True}, "wrong_type:rewardAmount"),
            ({**reward(), "details": []}, "wrong_type:details"),
            ({**reward(), "code": 5}, "wrong_type:code"),
            ({**reward(), "rewardId": "has space"}, "invalid_id:rewardId"),
            ({**reward(), "rewardId": "x" * 257}, "invalid_id:rewardId"),
        ],
    )
    def test_invalid_reward_is_rejected_with_its_reason(self, doc: object, reason: str) -> None:
        """A reward without campaignId/userId/rewardId, or not an object, or mistyped, is rejected with a
        code."""
        with pytest.raises(RewardRejected) as rejected:
            validate_reward(doc)
        assert rejected.value.reason.code == reason
        assert reason.split(":")[0] in REWARD_CATALOGUE

    def test_not_json_is_invalid_json(self) -> None:
        """Bytes that are not JSON are rejected as invalid_json."""
        with pytest.raises(RewardRejected, match="invalid_json"):
            parse_reward(b"\xff{")

    def test_null_optional_fields_are_dropped_and_extras_kept(self) -> None:
        """An optional field that is null counts as absent; fields beyond the spec's table pass through."""
        doc = validate_reward({**reward("r1"), "code": None, "details": None, "campaignRef": "x"})
        assert "code" not in doc and "details" not in doc and doc["campaignRef"] == "x"

    def test_split_rewards_keeps_one_object_verbatim_and_splits_arrays(self) -> None:
        """POST /rewards/v1: one object is stored byte for byte; an array becomes one record per element."""
        one = b'{ "rewardId": "a", "userId": "u", "campaignId": "c" }'
        assert split_rewards(one) == ([one], [])
        records, invalid = split_rewards(json.dumps([reward("a"), {"rewardId": "b"}]).encode())
        assert len(records) == 2 and json.loads(records[0])["rewardId"] == "a"
        assert invalid == [{"index": 1, "reason": "missing_field:campaignId"}]
        assert split_rewards(b"nope") == ([b"nope"], [{"index": None, "reason": "invalid_json"}])


class TestRetryPolicy:
    @pytest.mark.parametrize(
        ("status", "verdict"),
        [
            (200, "delivered"),
            (204, "delivered"),
            (None, "retry"),
            (500, "retry"),
            (503, "retry"),
            (429, "retry"),
            (408, "retry"),
            (400, "reject"),
            (401, "reject"),
            (404, "reject"),
            (301, "reject"),
        ],
    )
    def test_classify(self, status: int | None, verdict: str) -> None:
        """2xx delivered; 5xx, 408, 429 and no answer retried; other statuses dead-lettered at once."""
        assert classify(status) == verdict

    def test_default_schedule_is_eight_attempts_over_about_a_day(self) -> None:
        """Immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: 8 attempts within about 28 hours."""
        delays = tuple(d.total_seconds() for d in Settings().rewards.retry_delays)
        assert len(delays) + 1 == 8
        assert 20 * 3600 < sum(delays) < 30 * 3600
        assert retry_delay_s(8, delays, 0.1, None, 86400) is None

    def test_jitter_stays_within_its_fraction_and_retry_after_only_raises(self) -> None:
        """Delays are scaled by uniform(1-j, 1+j); Retry-After raises a delay up to the cap, never lowers
        it."""
        rng = random.Random(7)
        samples = [retry_delay_s(1, (10.0,), 0.1, None, 60, rng) for _ in range(200)]
        assert all(s is not None and 9.0 <= s <= 11.0 for s in samples) and len(set(samples)) > 100
        assert retry_delay_s(1, (10.0,), 0.0, 30, 60) == 30
        assert retry_delay_s(1, (10.0,), 0.0, 3, 60) == 10
        assert retry_delay_s(1, (10.0,), 0.0, 3600, 60) == 60

    def test_retry_after_seconds_or_http_date(self) -> None:
        """Retry-After is read as delta-seconds or as an HTTP date."""
        now = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
        assert parse_retry_after("120", now) == 120
        assert parse_retry_after("Fri, 01 Mar 2024 12:00:30 GMT", now) == 30
        assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None

    def test_breaker_opens_probes_and_closes(self) -> None:
        """5 consecutive failures open it; after the open time one probe goes out; a success closes it."""
        breaker = Breaker("t", failures=5, open_s=30)
        for _ in range(4):
            breaker.record(alive=False, now=0)
        assert breaker.admit(0) == "send"
        breaker.record(alive=False, now=0)
        assert breaker.admit(10) == "skip"
        assert breaker.admit(31) == "send" and breaker.admit(31) == "skip"  # one probe at a time
        breaker.record(alive=False, now=31)
        assert breaker.admit(40) == "skip" and breaker.admit(62) == "send"
        breaker.record(alive=True, now=62)
        assert breaker.state == "closed" and breaker.admit(62) == "send"


# --- the dispatcher, end to end -------------------------------------------------------------------------

BEHAVIOUR = {
    "flaky": "flaky",
    "bad": "bad",
    "hang": "hang",
    "limited": "ratelimited",
    "dead": "hang",
    "fixme": "bad",
    "gone": "gone",
}


@dataclass
class Rig:
    settings: Settings
    config: Path
    customer: Customer
    dispatcher: Dispatcher
    metrics_url: str

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text: str = response.read().decode()
            return text


@pytest.fixture(scope="module")
def rig(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One customer server and one dispatcher subprocess for the module; each test uses its own tenant."""
    loop = LoopThread()
    customer = start_customer(loop, BEHAVIOUR)
    tmp = tmp_path_factory.mktemp("rewards")

    def hook(tenant: str, **options: Any) -> dict[str, Any]:
        return {"url": customer.url(tenant), "allow_private_url": True, **options}

    tenants: list[dict[str, Any]] = [
        {
            "id": "acme",
            "write_keys": ["wk_rw_acme"],
            "rewards_keys": ["rk_rw_acme"],
            "rewards_webhook": hook(
                "acme", token=WORKED_TOKEN, standard_webhooks_secrets=[SW_SECRET, SW_SECRET_2]
            ),
        },
        {"id": "flaky", "rewards_webhook": hook("flaky", token="tok_flaky")},
        {"id": "bad", "rewards_webhook": hook("bad")},
        {"id": "hang", "rewards_webhook": hook("hang", timeout_s=0.5)},
        {"id": "limited", "rewards_webhook": hook("limited")},
        {"id": "dup", "rewards_webhook": hook("dup")},
        {"id": "dead", "rewards_webhook": hook("dead", timeout_s=2.0, max_concurrency=2)},
        {"id": "fast", "rewards_webhook": hook("fast")},
        {"id": "fixme", "rewards_webhook": hook("fixme")},
        {"id": "metered", "rewards_webhook": hook("metered")},
        {"id": "gone", "rewards_webhook": hook("gone")},
        {"id": "nohook", "write_keys": ["wk_rw_nohook"]},
    ]
    web_port = free_port()
    doc = settings_doc(
        kafka_bootstrap, f"t_rewards_{uuid.uuid4().hex[:8]}", tmp / "worker", web_port, tenants
    )
    config = tmp / "headwater.toml"
    config.write_text(render_toml(doc))
    dispatcher = Dispatcher(config, tmp / "dispatcher.log")
    try:
        yield Rig(
            Settings.model_validate(doc), config, customer, dispatcher, f"http://127.0.0.1:{web_port}/metrics"
        )
    finally:
        dispatcher.stop()
        loop.run(customer.stop())
        loop.close()


def test_worked_example_is_delivered_with_its_signature(rig: Rig) -> None:
    """The worked example, produced with other key order and spacing, goes out as the spec's exact bytes and
    X-CG-SIGNATURE 4bf3191c…, with X-Reward-Id and Standard Webhooks headers for both rotated secrets."""
    doc = json.loads(WORKED_BODY)
    shuffled = json.dumps(dict(reversed(list(doc.items()))), indent=1).encode()
    produce(rig.settings, [("acme", shuffled)])
    [seen] = wait_for(
        lambda: rig.customer.seen("acme", doc["rewardId"]), timeout=120
    )  # first: includes start-up
    assert seen.body == WORKED_BODY
    assert seen.headers["X-CG-SIGNATURE"] == WORKED_DIGEST
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Reward-Id"] == doc["rewardId"]
    assert seen.headers["webhook-id"] == webhook_id("acme", doc["rewardId"])
    assert len(seen.headers["webhook-signature"].split()) == 2
    for secret in (SW_SECRET, SW_SECRET_2):
        assert headwater.verify_standard_webhook(seen.body, dict(seen.headers), secret)


def test_unicode_reward_verifies_with_the_helper_and_a_reserializing_receiver(rig: Rig) -> None:
    """A non-ASCII reward verifies on the raw body (our helper) and after json.loads + compact json.dumps."""
    produce(rig.settings, [("acme", json.dumps(UNICODE_REWARD, ensure_ascii=True).encode())])
    [seen] = wait_for(lambda: rig.customer.seen("acme", UNICODE_REWARD["rewardId"]))
    header = seen.headers["X-CG-SIGNATURE"]
    assert "Café ☕".encode() in seen.body
    assert headwater.verify_signature(seen.body, header, WORKED_TOKEN)
    assert cg_signature(python_reserialized(seen.body), WORKED_TOKEN) == header


def test_two_503s_then_accepted_is_delivered_once_after_three_attempts(rig: Rig) -> None:
    """503, 503, 200: three requests with the same id, body and signature, attempts 1-3, three recorded
    outcomes, one delivery, no dead letter; the gaps follow the schedule (0.2 s, 0.5 s)."""
    doc = reward()
    produce(rig.settings, [("flaky", body(doc))])
    seen = wait_for(lambda: len(s := rig.customer.seen("flaky", doc["rewardId"])) == 3 and s)
    assert [s.headers["X-Reward-Attempt"] for s in seen] == ["1", "2", "3"]
    assert len({(s.body, s.headers["X-CG-SIGNATURE"], s.headers["X-Reward-Id"]) for s in seen}) == 1
    assert seen[1].at - seen[0].at >= 0.2 and seen[2].at - seen[1].at >= 0.5
    log = wait_for(lambda: len(o := outcomes(rig.settings, doc["rewardId"])) == 3 and o)
    assert [(o.attempt.status, o.verdict) for o in log] == [
        (503, "retry"),
        (503, "retry"),
        (200, "delivered"),
    ]
    assert all(o.attempt.latency_ms > 0 for o in log)
    time.sleep(1.0)
    assert len(rig.customer.seen("flaky", doc["rewardId"])) == 3
    assert not [d for d in dead_letters(rig.settings) if d.reward_id == doc["rewardId"]]


def test_400_is_dead_lettered_at_once_without_retry(rig: Rig) -> None:
    """A 400 is final: one request, then a rewards.dlq letter (reason rejected) with that one attempt."""
    doc = reward()
    produce(rig.settings, [("bad", body(doc))])
    [letter] = wait_for(lambda: [d for d in dead_letters(rig.settings) if d.reward_id == doc["rewardId"]])
    assert (letter.stage, letter.reason, letter.tenant) == ("delivery", "rejected", "bad")
    [attempt] = letter.attempts
    assert attempt.status == 400 and attempt.error is not None and "unknown user" in attempt.error
    assert json.loads(letter.body) == doc
    time.sleep(1.0)
    assert len(rig.customer.seen("bad", doc["rewardId"])) == 1


def test_no_answer_is_retried_then_dead_lettered_with_every_attempt(rig: Rig) -> None:
    """An endpoint that never answers: three attempts that each time out, then a letter holding all three."""
    doc = reward()
    produce(rig.settings, [("hang", body(doc))])
    [letter] = wait_for(lambda: [d for d in dead_letters(rig.settings) if d.reward_id == doc["rewardId"]])
    assert letter.reason == "attempts_exhausted"
    assert [a.number for a in letter.attempts] == [1, 2, 3]
    for attempt in letter.attempts:
        assert attempt.status is None and (attempt.error or "").startswith("timeout")
        assert 500 <= attempt.latency_ms < 1500
    assert len(rig.customer.seen("hang", doc["rewardId"])) == 3


def test_410_gone_stops_the_endpoint_and_dead_letters_its_rewards(rig: Rig) -> None:
    """410 Gone (Standard Webhooks): the reward is dead-lettered (endpoint_gone) and the endpoint is not
    called again: the tenant's next reward is dead-lettered without a request."""
    first, second = reward(), reward()
    produce(rig.settings, [("gone", body(first))])
    [letter] = wait_for(lambda: [d for d in dead_letters(rig.settings) if d.reward_id == first["rewardId"]])
    assert (letter.reason, [a.status for a in letter.attempts]) == ("endpoint_gone", [410])
    produce(rig.settings, [("gone", body(second))])
    [later] = wait_for(lambda: [d for d in dead_letters(rig.settings) if d.reward_id == second["rewardId"]])
    [attempt] = later.attempts
    assert later.reason == "endpoint_gone" and attempt.status is None and "410 Gone" in (attempt.error or "")
    assert [s.reward_id for s in rig.customer.seen("gone")] == [first["rewardId"]]


def test_webhook_id_holds_no_dot_though_the_reward_id_does(rig: Rig) -> None:
    """webhook-id is derived from tenant and rewardId (a Standard Webhooks id has no '.'), the same on
    every attempt, and the signature verifies over it."""
    doc = reward(f"r.{uuid.uuid4().hex[:6]}.v2")
    produce(rig.settings, [("acme", body(doc))])
    [seen] = wait_for(lambda: rig.customer.seen("acme", doc["rewardId"]), timeout=60)
    assert "." not in seen.headers["webhook-id"]
    assert seen.headers["webhook-id"] == webhook_id("acme", doc["rewardId"])
    assert headwater.verify_standard_webhook(seen.body, dict(seen.headers), SW_SECRET)


def test_health_answers_and_no_faust_view_is_served(rig: Rig) -> None:
    """The dispatcher serves /metrics and /health (200, both stages listed); Faust's views are not there."""
    base = rig.metrics_url.removesuffix("/metrics")
    with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
        health = json.loads(response.read())
    assert response.status == 200 and health["status"] == "ok"
    assert set(health["stages"]) == {"rewards-intake", "rewards-delivery"}
    for view in ("/table", "/router", "/graph", "/", "/stats"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}{view}", timeout=5)
        assert refused.value.code == 404, view


def test_429_retry_after_is_honoured(rig: Rig) -> None:
    """429 + Retry-After: 1 delays the retry to at least 1 s, though the schedule says 0.2 s."""
    doc = reward()
    produce(rig.settings, [("limited", body(doc))])
    first, second = wait_for(lambda: len(s := rig.customer.seen("limited", doc["rewardId"])) == 2 and s)
    assert second.at - first.at >= 0.95


def test_same_reward_id_produced_twice_is_delivered_once(rig: Rig) -> None:
    """The same rewardId produced twice at once and once more after delivery reaches the customer once."""
    doc = reward()
    produce(rig.settings, [("dup", body(doc)), ("dup", body(doc))])
    wait_for(lambda: rig.customer.seen("dup", doc["rewardId"]))
    wait_for(
        lambda: 'headwater_rewards_deliveries_total{outcome="duplicate",tenant="dup"} 1.0' in rig.metrics()
    )
    produce(rig.settings, [("dup", body({**doc, "rewardName": "changed"}))])
    wait_for(
        lambda: 'headwater_rewards_deliveries_total{outcome="duplicate",tenant="dup"} 2.0' in rig.metrics()
    )
    assert len(rig.customer.seen("dup", doc["rewardId"])) == 1


def test_invalid_records_reach_the_dlq_with_reasons_and_their_bytes(rig: Rig) -> None:
    """Bad JSON, an array, a missing id, a wrong type, no/unknown tenant, no webhook: each is one letter."""
    marker = uuid.uuid4().hex
    cases: list[tuple[str | None, bytes, str]] = [
        ("acme", f"not json {marker}".encode(), "invalid_json"),
        ("acme", json.dumps([reward(marker)]).encode(), "not_an_object"),
        ("acme", body({**reward(marker), "rewardId": None, "code": marker}), "missing_field:rewardId"),
        ("acme", body({**reward(marker), "rewardAmount": "ten"}), "wrong_type:rewardAmount"),
        (None, body(reward(f"{marker}-1")), "missing_tenant"),
        ("initech", body(reward(f"{marker}-2")), "unknown_tenant"),
        ("nohook", body(reward(f"{marker}-3")), "no_webhook"),
    ]
    produce(rig.settings, [(tenant, raw) for tenant, raw, _ in cases])
    letters = wait_for(
        lambda: len(d := [x for x in dead_letters(rig.settings) if marker.encode() in x.body]) == 7 and d
    )
    by_body = {d.body: d for d in letters}
    for tenant, raw, reason in cases:
        assert (by_body[raw].stage, by_body[raw].reason, by_body[raw].tenant) == ("intake", reason, tenant)


def test_receiver_route_takes_one_reward_or_an_array(
    rig: Rig, start_receiver: Callable[[Settings], str]
) -> None:
    """POST /rewards/v1 (X-API-KEY = a rewards key): an array is split; valid rewards are delivered, the
    invalid one is named in the 200 answer and dead-lettered; a wrong key, or a vendor write key, gets 401."""
    base = start_receiver(rig.settings)
    good = [reward(), reward()]
    bad = {**reward(), "userId": None}
    payload = json.dumps([*good, bad]).encode()

    async def post(key: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                base + "/rewards/v1",
                data=payload,
                headers={"X-API-KEY": key, "Content-Type": "application/json"},
            ) as response,
        ):
            return response.status, await response.json()

    assert asyncio.run(post("wk_nope"))[0] == 401
    assert asyncio.run(post("wk_rw_acme"))[0] == 401
    status, answer = asyncio.run(post("rk_rw_acme"))
    assert (status, answer["count"], answer["invalid"]) == (
        200,
        3,
        [{"index": 2, "reason": "missing_field:userId"}],
    )
    for doc in good:
        wait_for(lambda: rig.customer.seen("acme", doc["rewardId"]))  # noqa: B023
    [letter] = wait_for(lambda: [d for d in dead_letters(rig.settings) if d.reward_id == bad["rewardId"]])
    assert letter.reason == "missing_field:userId"


def test_a_dead_endpoint_of_one_tenant_does_not_delay_another(rig: Rig) -> None:
    """Tenant `dead` never answers (2 s timeouts, 20 rewards queued); tenant `fast` is delivered within
    0.5 s of each produce all the same (measured), and `dead`'s breaker opens."""
    produce(rig.settings, [("dead", body(reward())) for _ in range(20)])
    wait_for(lambda: len(rig.customer.seen("dead")) >= 2)
    fast = [reward() for _ in range(10)]
    sent = [produce(rig.settings, [("fast", body(doc))])[0] for doc in fast]
    arrived = [wait_for(lambda: rig.customer.seen("fast", doc["rewardId"]))[0].at for doc in fast]  # noqa: B023
    latencies = [a - s for s, a in zip(sent, arrived, strict=True)]
    assert max(latencies) < 0.5, (
        f"fast tenant latency while dead tenant hangs: max {max(latencies) * 1000:.0f} ms, "
        f"mean {sum(latencies) / len(latencies) * 1000:.0f} ms"
    )
    wait_for(lambda: 'headwater_rewards_breaker_open{tenant="dead"} 1.0' in rig.metrics(), timeout=20)


def test_dlq_ls_show_and_redeliver(rig: Rig) -> None:
    """`rewards dlq ls/show/redeliver`: a 400'd reward is listed, shown, redelivered after the endpoint is
    fixed, and a second redeliver of the now-delivered reward sends nothing."""
    doc = reward()
    produce(rig.settings, [("fixme", body(doc))])
    [letter] = wait_for(lambda: [d for d in dead_letters(rig.settings) if d.reward_id == doc["rewardId"]])
    runner = CliRunner()
    listed = runner.invoke(
        main, ["--config", str(rig.config), "rewards", "dlq", "ls", "--tenant", "fixme", "--json"]
    )
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [letter.id]
    shown = runner.invoke(main, ["--config", str(rig.config), "rewards", "dlq", "show", letter.id])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["body"] == letter.body.decode()
    assert (
        runner.invoke(main, ["--config", str(rig.config), "rewards", "dlq", "show", "rdl_nope"]).exit_code
        == 2
    )
    rig.customer.behaviour["fixme"] = "ok"
    redo = runner.invoke(main, ["--config", str(rig.config), "rewards", "dlq", "redeliver", letter.id])
    assert redo.exit_code == 0 and "redelivered 1" in redo.stdout, redo.output
    wait_for(lambda: len(rig.customer.seen("fixme", doc["rewardId"])) == 2)
    assert (
        runner.invoke(main, ["--config", str(rig.config), "rewards", "dlq", "redeliver", letter.id]).exit_code
        == 0
    )
    wait_for(
        lambda: 'headwater_rewards_deliveries_total{outcome="duplicate",tenant="fixme"} 1.0' in rig.metrics()
    )
    assert len(rig.customer.seen("fixme", doc["rewardId"])) == 2


def test_metrics_by_tenant_and_outcome(rig: Rig) -> None:
    """/metrics on the dispatcher: deliveries by tenant and outcome, attempt latency, retry queue depth."""
    doc = reward()
    produce(rig.settings, [("metered", body(doc))])
    wait_for(lambda: rig.customer.seen("metered", doc["rewardId"]))
    text = wait_for(lambda: 'outcome="delivered",tenant="metered"' in (t := rig.metrics()) and t)
    assert 'headwater_rewards_attempts_total{result="2xx",tenant="metered"} 1.0' in text
    assert 'headwater_rewards_attempt_seconds_bucket{le="0.5",tenant="metered"} 1.0' in text
    assert 'headwater_rewards_retry_queue_depth{tenant="metered"} 0.0' in text
    assert "headwater_rewards_in_flight" in text
