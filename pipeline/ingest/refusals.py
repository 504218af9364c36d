"""Why the receiver refuses a request, as exceptions that map to one status each (never a 5xx for input)."""

from __future__ import annotations

from pipeline.errors import HeadwaterError


class BadRequest(HeadwaterError):
    """A header, query value or body the receiver cannot take as it is -> 400 with the reason."""


class OverShare(HeadwaterError):
    """The tenant holds more than its share of the in-flight bound while others wait -> 429 + Retry-After."""

    def __init__(self, message: str, retry_after_s: float, evicted: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.evicted = evicted  # raised while its body was being read, to free its bytes


class TooSlow(HeadwaterError):
    """The request body did not arrive within its deadlines -> 408 with the reason; the connection closes."""
