"""Writing the dispatcher's outputs so that no record is acknowledged before its output is durable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from faust.types import Message

log = logging.getLogger(__name__)
WRITE_RETRY_MAX_S = 5.0  # longest pause between two tries of a Kafka call that failed
T = TypeVar("T")


async def retried(
    attempt: Callable[[], Awaitable[T]], failure: str, keep_trying: Callable[[], bool] = lambda: True
) -> T | None:
    """attempt() again, after pauses growing to WRITE_RETRY_MAX_S, until it succeeds (its result) or
    keep_trying() turns false (None). Each failure is logged as `failure`, with its traceback."""
    delay_s = 0.2
    while keep_trying():
        try:
            return await attempt()
        except Exception:
            log.exception("%s; retrying", failure)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, WRITE_RETRY_MAX_S)
    return None


async def write_durably(message: Message, send: Callable[[], Awaitable[Awaitable[Any]]]) -> None:
    """Send one output and await its own ack, again until it succeeds.

    Faust flushes the producer before it commits but never looks at the results: a record whose output
    failed would be committed over. So the agent stays on the record until its output is durable; if
    the worker stops meanwhile, the record is marked so that its offset is never committed.
    """

    async def sent() -> None:
        await (await send())

    try:
        await retried(sent, f"could not write the outcome of {message.partition}:{message.offset}")
    except asyncio.CancelledError:
        message.acked = True  # Faust acks in a finally; an acked-looking message never reaches the commit
        raise


def text_headers(raw: Any) -> dict[str, str]:
    """A Faust message's headers as text (names to values)."""
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for k, v in pairs}


def header_list(headers: list[tuple[str, bytes]] | Mapping[str, bytes] | None) -> list[tuple[str, bytes]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)
