"""Hostile rewards at the dispatcher's intake: every record ends as a delivery job or a
rewards.dlq dead letter with its reason, never as a log line. By value first, then on the real broker
with a real `headwater rewards run` subprocess and a real webhook server."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rigs.kafka import wait_for
from rigs.rewards import (
    acme_dispatcher,
    dead_letters,
    produce_with_headers,
)

from pipeline.cli import main
from pipeline.rewards.records import (
    MAX_REWARD_BYTES,
    DeliveryJob,
    RewardDeadLetter,
    parse_message,
    read_intake,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WEBHOOKS = {"acme": True, "nohook": False}


def reward(reward_id: str, **fields: Any) -> dict[str, Any]:
    return {"rewardId": reward_id, "campaignId": "c1", "userId": "u1", **fields}


def nested(depth: int) -> str:
    """JSON text of an object nested `depth` levels deep: {"a": {"a": ... {}}} (json.dumps would recurse)."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def hostile(marker: str) -> list[tuple[str, list[tuple[str, bytes]], bytes | None, str]]:
    """(name, headers, value, expected reason): each record carries `marker` in its first bytes."""
    acme = [("hw-tenant", b"acme")]

    def doc(name: str, **fields: Any) -> bytes:
        return json.dumps(reward(f"{marker}-{name}", **fields)).encode()

    def deep(name: str, depth: int) -> bytes:
        return doc(name, details="DEEP").replace(b'"DEEP"', nested(depth).encode())

    return [
        ("nested 100 deep", acme, deep("deep100", 100), "too_deep"),
        ("nested 900 deep", acme, deep("deep900", 900), "too_deep"),
        ("nested 2000 deep", acme, deep("deep2000", 2000), "invalid_json"),
        (
            "details over the size limit",
            acme,
            doc("huge", details={"x": "y" * MAX_REWARD_BYTES}),
            "too_large",
        ),
        (
            "rewardId a number",
            acme,
            json.dumps({**reward(marker), "rewardId": 7, "rewardName": marker}).encode(),
            "wrong_type:rewardId",
        ),
        ("details an array", acme, doc("list", details=[1, 2]), "wrong_type:details"),
        ("rewardAmount a boolean", acme, doc("bool", rewardAmount=True), "wrong_type:rewardAmount"),
        ("campaignId an object", acme, doc("obj", campaignId={"id": 1}), "wrong_type:campaignId"),
        (
            "rewardAmount infinite",
            acme,
            f'{{"rewardId": "{marker}-inf", "rewardAmount": 1e999}}'.encode(),
            "invalid_json",
        ),
        (
            "a lone surrogate",
            acme,
            f'{{"rewardId": "{marker}-sur", "code": "\\ud800"}}'.encode(),
            "invalid_json",
        ),
        ("not UTF-8", acme, marker.encode() + b"\xff\xfe{", "invalid_json"),
        (
            "hw-redrive-count not a number",
            [*acme, ("hw-redrive-count", b"many")],
            doc("count"),
            "invalid_header:hw-redrive-count",
        ),
        ("hw-tenant not UTF-8", [("hw-tenant", b"\xff\xfeacme")], doc("tenant"), "unknown_tenant"),
        ("hw-tenant of 10 kB", [("hw-tenant", b"t" * 10_000)], doc("longtenant"), "unknown_tenant"),
    ]


class TestReadIntake:
    @pytest.mark.parametrize("case", hostile("m"), ids=lambda case: case[0])
    def test_a_hostile_record_becomes_one_dead_letter_with_its_reason(
        self, case: tuple[str, list[tuple[str, bytes]], bytes | None, str]
    ) -> None:
        """read_intake never raises: a hostile record is a dead letter with the expected reason code."""
        _, headers, value, expected = case
        text = {k: v.decode("utf-8", "replace") for k, v in headers}
        outcome = read_intake(value or b"", text, WEBHOOKS, "rewards:0:1", NOW)
        assert isinstance(outcome, RewardDeadLetter)
        assert (outcome.stage, outcome.reason) == ("intake", expected)
        assert len(outcome.to_json()) < 2 * MAX_REWARD_BYTES  # always fits a Kafka record

    def test_an_oversize_body_is_kept_cut_with_its_original_size(self) -> None:
        """A too-large record's dead letter keeps its first MAX_REWARD_BYTES and says how long it was."""
        value = json.dumps(reward("big", details={"x": "y" * MAX_REWARD_BYTES})).encode()
        letter = read_intake(value, {"hw-tenant": "acme"}, WEBHOOKS, "rewards:0:1", NOW)
        assert isinstance(letter, RewardDeadLetter)
        assert letter.body == value[:MAX_REWARD_BYTES] and letter.original_bytes == len(value)

    def test_the_job_carries_the_body_as_its_bytes_not_escaped_again(self) -> None:
        """A body of control characters (6 bytes each as JSON) is a job whose record is the fields, a
        newline, then the body's bytes: the body is not escaped into the job and fits as the record did."""
        value = json.dumps(reward("escaped", details={"x": "\x01" * 40_000})).encode()
        job = read_intake(value, {"hw-tenant": "acme"}, WEBHOOKS, "rewards:0:1", NOW)
        assert isinstance(job, DeliveryJob) and job.body is not None
        assert job.to_record().endswith(b"\n" + job.body) and len(job.to_record()) < len(value) + 300
        assert parse_message(job.to_record()) == job

    def test_a_valid_reward_nested_64_deep_is_a_job(self) -> None:
        """The depth limit is 64 levels, the reward object counted: details may nest 63 deep."""
        value = json.dumps(reward("ok", details="DEEP")).encode().replace(b'"DEEP"', nested(63).encode())
        job = read_intake(value, {"hw-tenant": "acme"}, WEBHOOKS, "rewards:0:1", NOW)
        assert isinstance(job, DeliveryJob) and job.reward_id == "ok"


def test_hostile_rewards_on_the_broker_each_end_as_one_dead_letter_and_the_next_is_delivered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Every hostile record on rewards.outbound becomes exactly one rewards.dlq record with its reason; the
    valid reward produced after them is delivered, and the dispatcher logs no intake failure."""
    marker = uuid.uuid4().hex
    cases = hostile(marker)
    with acme_dispatcher(kafka_bootstrap, tmp_path, "t_rewards_hostile") as rig:
        settings, config, customer, dispatcher = rig.settings, rig.config, rig.customer, rig.dispatcher
        good = f"{marker}-good"
        produce_with_headers(
            settings,
            [(headers, value) for _, headers, value, _ in cases]
            + [([("hw-tenant", b"acme")], json.dumps(reward(good)).encode())],
        )
        wait_for(lambda: customer.seen("acme", good), timeout=120)
        letters = wait_for(lambda: len(found := dead_letters(settings)) >= len(cases) and found, timeout=60)
        by_origin = {d.origin: d for d in letters}
        assert len(by_origin) == len(letters) == len(cases)  # one letter per record, none twice
        assert sorted(d.reason for d in letters) == sorted(expected for *_, expected in cases)
        for letter in letters:
            assert letter.stage == "intake" and marker.encode() in letter.body[:200]
        assert "intake crashed" not in dispatcher.output() and "intake failed" not in dispatcher.output()
        redelivered = CliRunner().invoke(
            main, ["--config", str(config), "rewards", "dlq", "redeliver", "--all", "--reason", "too_large"]
        )
        assert redelivered.exit_code == 0, redelivered.output
        # the record over the limit is kept cut and skipped (no job is larger than its record any more: the
        # body is not escaped into it, so no too_large letter holds a whole record to redeliver)
        assert "skipping 1 too large" in redelivered.output and "redelivered 0 " in redelivered.output
