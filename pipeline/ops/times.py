"""Times as operators type them: ISO-8601 or a duration ago ('2h', '7d'), for replay and the DLQ tools."""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.config import parse_duration
from pipeline.errors import HeadwaterError


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO-8601 (naive = UTC), or a duration ago such as '2h' or '7d'."""
    now = now or datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - parse_duration(text)
        except ValueError:
            raise HeadwaterError(
                f"cannot read {text!r} as a time (ISO-8601, or a duration ago like '2h')"
            ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
