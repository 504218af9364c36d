"""Request ids: ULIDs, unique and sortable by time, made once per request by the receiver."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 characters


_time_part: tuple[int, str] = (-1, "")
_RANDOM_POOL_IDS = 256  # ids' worth of os.urandom bytes read per system call
_random_pool = b""
_random_at = 0


def _forget_random_pool() -> None:
    """A forked child must not hand out the random bytes its parent will use too."""
    global _random_pool, _random_at
    _random_pool, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random_pool)


def new_request_id(now_ns: int | None = None) -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32; unique and sortable by time.

    Two characters per lookup; the ten characters of the time are kept for their millisecond, and the
    random bits come from os.urandom 256 ids at a time, each byte used once (the receiver makes one id
    per request, several per millisecond under load)."""
    global _time_part, _random_pool, _random_at
    millis = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    if _time_part[0] != millis:
        _time_part = (millis, "".join([_PAIRS[(millis >> shift) & 1023] for shift in (40, 30, 20, 10, 0)]))
    at = _random_at
    if at == len(_random_pool):
        _random_pool, at = os.urandom(10 * _RANDOM_POOL_IDS), 0
    _random_at = at + 10
    r = int.from_bytes(_random_pool[at : at + 10], "big")
    p = _PAIRS
    return "".join(
        (
            _time_part[1],
            p[r >> 70],
            p[r >> 60 & 1023],
            p[r >> 50 & 1023],
            p[r >> 40 & 1023],
            p[r >> 30 & 1023],
            p[r >> 20 & 1023],
            p[r >> 10 & 1023],
            p[r & 1023],
        )
    )
