"""The dispatcher's /health follows the worker's rule: 503 when a stage has lag and has not committed for
worker.stall_limit_s (Kubernetes then restarts the process), 200 again once it commits. Real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

from aiokafka import TopicPartition

from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.rewards.dispatcher import RewardsWeb
from pipeline.rewards.metrics import RewardMetrics
from pipeline.stream.consuming import StageProgress


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_health_is_503_while_a_stage_with_lag_makes_no_progress_and_200_once_it_commits() -> None:
    port = free_port()
    settings = Settings.model_validate({"worker": {"stall_limit_s": 5}, "rewards": {"web_port": port}})
    intake, delivery = StageProgress("rewards-intake"), StageProgress("rewards-delivery")
    url = f"http://127.0.0.1:{port}/health"

    async def run() -> None:
        web = RewardsWeb(settings, RewardMetrics(), {"rewards-intake": intake, "rewards-delivery": delivery})
        await web.on_start()
        try:
            assert (await asyncio.to_thread(get, url))[0] == 200
            delivery.lags[TopicPartition("rewards.deliveries", 0)] = 3
            delivery.last_commit = delivery.caught_up = time.monotonic() - 60  # busy, nothing committed
            status, body = await asyncio.to_thread(get, url)
            assert status == 503 and body["status"] == "stalled"
            assert (
                body["stages"]["rewards-delivery"]["stalled"]
                and not body["stages"]["rewards-intake"]["stalled"]
            )
            delivery.last_commit = time.monotonic()
            assert (await asyncio.to_thread(get, url))[0] == 200
        finally:
            await web.on_stop()

    asyncio.run(run())
