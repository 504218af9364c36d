"""Reading a request body within its deadlines and the byte budget.

A body must arrive within `body_timeout_s` in all, and no slower than `body_min_bytes_per_s` once its first
`body_grace_s` are over (the bytes received so far buy time at that rate); a sender that misses either
gets 408 with a JSON reason and the connection is closed. Each chunk is counted in the tenant's bytes as
it arrives (pipeline.ingest.admission), so a trickled upload holds only what it has sent; when the budget
is full, reading waits (TCP pushes back on the sender) or gives way to another tenant.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pipeline.config import ReceiverSettings
from pipeline.errors import PayloadTooLarge
from pipeline.ingest.admission import Admission, Lease
from pipeline.ingest.refusals import BadRequest, OverShare, TooSlow


async def read_body(request: web.BaseRequest, lease: Lease, admission: Admission) -> bytes:
    """The whole body, counted in `lease` as it arrives; raises TooSlow, PayloadTooLarge or OverShare."""
    content = request.content
    cfg = admission.cfg
    if content.is_eof():  # the whole body came with the head: the common case, no timers needed
        try:
            body = content.read_nowait(-1)
        except HttpProcessingError as exc:
            raise BadRequest(f"the body cannot be read: {exc.message}") from None
        _check_size(len(body), cfg)
        waiting = admission.charge(lease, len(body))
        if waiting is not None:  # not yet reading: nothing of this lease to evict while it waits
            await waiting
        return body
    return await _read_slowly(request, lease, admission)


async def _read_slowly(request: web.BaseRequest, lease: Lease, admission: Admission) -> bytes:
    cfg = admission.cfg
    content = request.content
    loop = asyncio.get_running_loop()
    started = loop.time()
    final = started + cfg.body_timeout_s
    chunks: list[bytes] = []
    size = 0
    task = asyncio.current_task()
    assert task is not None
    admission.start_reading(lease, task)
    try:
        async with asyncio.timeout(None) as deadline:
            while True:
                deadline.reschedule(min(final, started + cfg.body_grace_s + size / cfg.body_min_bytes_per_s))
                chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                _check_size(size, cfg)
                waiting = admission.charge(lease, len(chunk))
                if waiting is not None:
                    await waiting
                chunks.append(chunk)
    except TimeoutError:
        raise TooSlow(_too_slow(size, loop.time() - started, cfg)) from None
    except asyncio.CancelledError:
        _raise_if_evicted(lease, task, cfg)
        raise
    except ConnectionError:
        raise BadRequest("the connection closed before the body was complete") from None
    except HttpProcessingError as exc:  # a broken chunked encoding or compressed body
        raise BadRequest(f"the body cannot be read: {exc.message}") from None
    finally:
        admission.stop_reading(lease)
    return b"".join(chunks)


def _raise_if_evicted(lease: Lease, task: asyncio.Task[Any], cfg: ReceiverSettings) -> None:
    """The cancellation was our eviction (not a shutdown): answer 429 instead."""
    if lease.evicted and task.uncancel() == 0:
        raise OverShare(
            "this tenant is over its share of the receiver's in-memory bytes while others wait",
            cfg.retry_after_s,
            evicted=True,
        ) from None


def _check_size(size: int, cfg: ReceiverSettings) -> None:
    if size > cfg.max_body_bytes:
        raise PayloadTooLarge(f"body is over the limit of {cfg.max_body_bytes} bytes")


def _too_slow(size: int, elapsed: float, cfg: ReceiverSettings) -> str:
    if elapsed >= cfg.body_timeout_s:
        return f"the body did not arrive within {cfg.body_timeout_s:g} s ({size} bytes received)"
    return (
        f"the body arrived slower than {cfg.body_min_bytes_per_s} bytes/s ({size} bytes in {elapsed:.1f} s)"
    )
