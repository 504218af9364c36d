"""Intake: rewards.outbound -> a DeliveryJob on rewards.deliveries, or a dead letter on rewards.dlq.

Every record gets one of the two, durably, before it is acknowledged: intake never raises for
input, a bug becomes an intake_crashed letter, and a letter that cannot be written becomes the plainest one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from faust.types import Message

from pipeline import reasons
from pipeline.records import utc_now
from pipeline.rewards.metrics import RewardMetrics
from pipeline.rewards.outputs import header_list, text_headers, write_durably
from pipeline.rewards.records import (
    DeliveryJob,
    RewardRejected,
    delivery_key,
    intake_dead_letter,
    read_intake,
)

log = logging.getLogger(__name__)


class Intake:
    """The intake agent's work, given the two output topics, which tenants have a webhook, and the metrics."""

    def __init__(
        self, deliveries: Any, dlq: Any, webhooks: Mapping[str, bool], metrics: RewardMetrics
    ) -> None:
        self.deliveries = deliveries
        self.dlq = dlq
        self.webhooks = webhooks
        self.metrics = metrics

    async def handle(self, message: Message) -> None:
        """take(), and if the dead-letter path itself failed, the plainest letter there is."""
        try:
            await self.take(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("intake failed for %s:%s", message.partition, message.offset)
            self.metrics.errors.labels("intake").inc()
            letter = last_resort(message)
            await write_durably(message, lambda: self.dlq.send(key=None, value=letter))

    async def take(self, message: Message) -> None:
        """One record -> a durable job or dead letter, then (by returning) its ack; never raises for input."""
        origin = f"{message.topic}:{message.partition}:{message.offset}"
        body: bytes = message.value or b""
        headers = text_headers(message.headers)
        try:
            outcome = read_intake(body, headers, self.webhooks, origin, utc_now())
        except Exception as exc:  # a bug in intake: the record still gets an outcome
            log.exception("intake crashed on %s; dead-lettering it", origin)
            self.metrics.errors.labels("intake").inc()
            crashed = RewardRejected(reasons.REWARD_INTAKE_CRASHED, f"{type(exc).__name__}: {exc}")
            outcome = intake_dead_letter(
                body, headers.get("hw-tenant") or None, None, crashed, origin, 0, utc_now()
            )
        if isinstance(outcome, DeliveryJob):
            key, value = delivery_key(outcome.tenant, outcome.reward_id), outcome.to_json()
            await write_durably(message, lambda: self.deliveries.send(key=key, value=value))
            return
        letter = outcome.to_json()
        kept = header_list(message.headers)
        await write_durably(message, lambda: self.dlq.send(key=message.key, value=letter, headers=kept))
        self.metrics.deliveries.labels(outcome.tenant or "-", "invalid").inc()
        log.info("reward %s dead-lettered at intake: %s: %s", origin, outcome.reason, outcome.message)


def last_resort(message: Message) -> bytes:
    """The plainest dead letter there is, for a record whose own dead letter could not be written."""
    origin = f"{message.topic}:{message.partition}:{message.offset}"
    crashed = RewardRejected(reasons.REWARD_INTAKE_CRASHED, "the dead letter could not be written")
    return intake_dead_letter(message.value or b"", None, None, crashed, origin, 0, utc_now()).to_json()
