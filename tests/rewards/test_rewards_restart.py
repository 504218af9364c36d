"""Retries survive a restart, and nothing already recorded is sent again after one (real broker).

Three rewards to an endpoint that answers 503 twice per reward, then 200, with a 4 s first retry delay:
the dispatcher is SIGKILLed once every first attempt's outcome is durable, a second one makes attempts 2
and 3 from the restored state (no attempt number twice), and a third one, started after every delivery is
recorded, sends none of them again while it delivers a new reward.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from rigs.kafka import LoopThread, wait_for
from rigs.rewards import (
    Dispatcher,
    dead_letters,
    outcomes,
    produce,
    render_toml,
    settings_doc,
    start_customer,
)

from pipeline.config import Settings
from pipeline.kafka.local import free_port


@pytest.mark.slow
def test_retries_survive_a_sigkill_and_a_restart_re_sends_nothing_recorded(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    loop = LoopThread()
    customer = start_customer(loop, {"flaky": "flaky"})
    tenants: list[dict[str, Any]] = [
        {"id": "flaky", "rewards_webhook": {"url": customer.url("flaky"), "allow_private_url": True}}
    ]
    doc = settings_doc(
        kafka_bootstrap,
        f"t_rewards_restart_{uuid.uuid4().hex[:8]}",
        tmp_path / "worker",
        free_port(),
        tenants,
        retry_delays=["4s", "0.2s"],
    )
    settings = Settings.model_validate(doc)
    config = tmp_path / "headwater.toml"
    config.write_text(render_toml(doc))
    ids = [f"restart-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]

    def attempts(rid: str) -> list[str]:
        return [s.headers["X-Reward-Attempt"] for s in customer.seen("flaky", rid)]

    first = Dispatcher(config, tmp_path / "first.log", exit_after_s=120)
    try:
        produce(
            settings,
            [
                ("flaky", json.dumps({"campaignId": "c", "userId": "u", "rewardId": rid}).encode())
                for rid in ids
            ],
        )
        wait_for(
            lambda: all(len(outcomes(settings, rid)) == 1 for rid in ids),
            timeout=90,
            explain=lambda: first.output()[-4000:],
        )
        first.process.kill()  # within the 4 s retry delay: every reward has one recorded 503 and is pending
        first.process.wait(10)
        assert {rid: attempts(rid) for rid in ids} == {rid: ["1"] for rid in ids}
        second = Dispatcher(config, tmp_path / "second.log", exit_after_s=120)
        try:
            wait_for(
                lambda: all(
                    [o.verdict for o in outcomes(settings, rid)] == ["retry", "retry", "delivered"]
                    for rid in ids
                ),
                timeout=90,
                explain=lambda: second.output()[-4000:],
            )
        finally:
            second.stop()
        assert {rid: attempts(rid) for rid in ids} == {rid: ["1", "2", "3"] for rid in ids}
        third = Dispatcher(config, tmp_path / "third.log", exit_after_s=120)
        try:
            sentinel = f"restart-new-{uuid.uuid4().hex[:6]}"
            new = json.dumps({"campaignId": "c", "userId": "u", "rewardId": sentinel}).encode()
            produce(settings, [("flaky", new)])
            wait_for(
                lambda: [o.verdict for o in outcomes(settings, sentinel)] == ["retry", "retry", "delivered"],
                timeout=90,
                explain=lambda: third.output()[-4000:],
            )
            assert "caught up" in third.output()  # its partitions were released before the sentinel went out
        finally:
            third.stop()
        assert {rid: attempts(rid) for rid in ids} == {rid: ["1", "2", "3"] for rid in ids}
        assert dead_letters(settings) == []
    finally:
        first.stop()
        loop.run(customer.stop())
        loop.close()
