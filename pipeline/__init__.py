"""Headwater: vendor webhooks in, one clean deduplicated event stream out, nothing lost.

Data flow: HTTP request -> RawRecord (raw.<source>) -> vendor records -> CanonicalEvent | DeadLetter.
"""

__version__ = "0.1.0"
