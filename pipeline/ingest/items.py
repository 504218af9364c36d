"""The per-request item limits: `receiver.max_items` for batched sources, `receiver.max_rewards` for
/rewards/v1, both checked while scanning the body, before any per-item work (413 with the limit).

A scan walks the body in Python, so a large body is scanned on one helper thread instead of the event
loop: the loop keeps answering other requests meanwhile (the thread yields the interpreter every few
milliseconds), and at most one large scan runs at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pipeline.config import ReceiverSettings
from pipeline.errors import PayloadTooLarge
from pipeline.ingest.jsonspan import TooManyItems, check_item_count
from pipeline.ingest.reward_body import Invalid, split_reward_body

INLINE_SCAN_BYTES = 16_384  # bodies up to this are scanned on the loop: ~3 ms at worst
T = TypeVar("T")


class ItemLimits:
    """Scans bodies for their item counts (and reward bodies into their elements)."""

    def __init__(self, cfg: ReceiverSettings) -> None:
        self.cfg = cfg
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headwater-scan")

    async def check_batch(self, body: bytes) -> None:
        """PayloadTooLarge when a batched source's body holds more than max_items items."""
        limit = self.cfg.max_items
        if body.count(b",") < limit:  # fewer separators than the limit: it cannot hold more items
            return
        try:
            await self._run(check_item_count, body, limit)
        except TooManyItems:
            raise PayloadTooLarge(
                f"the body holds more than {limit} items; the limit is receiver.max_items = {limit}"
            ) from None

    async def split_rewards(self, body: bytes) -> tuple[list[bytes], list[Invalid]]:
        """The body's rewards as their exact bytes, and the invalid ones; PayloadTooLarge over max_rewards."""
        limit = self.cfg.max_rewards
        try:
            return await self._run(split_reward_body, body, limit)
        except TooManyItems:
            raise PayloadTooLarge(
                f"the body holds more than {limit} rewards; the limit is receiver.max_rewards = {limit}"
            ) from None

    async def _run(self, scan: Callable[[bytes, int], T], body: bytes, limit: int) -> T:
        if len(body) <= INLINE_SCAN_BYTES:
            return scan(body, limit)
        return await asyncio.get_running_loop().run_in_executor(self._thread, scan, body, limit)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
