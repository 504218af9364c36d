"""Reading request values within our limits: text that breaks them is a 400, never an exception later.

aiohttp decodes header bytes as UTF-8 with surrogate escapes, so invalid UTF-8 arrives as lone surrogates
that fail on `.encode()`; these helpers catch that, and the 256-character limit of RawHeaders, up front.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from pipeline.adapting import Header, RequestValue
from pipeline.ingest.refusals import BadRequest

MAX_TEXT = 256  # RawHeaders' ShortText: what a stored header value may hold


def is_text(value: str) -> bool:
    """True when the value is valid Unicode text (no surrogate escapes of invalid UTF-8 bytes)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def short_text(value: str | None, what: str) -> str | None:
    """A value we store in a header: at most 256 characters of valid text, else BadRequest."""
    if value is None:
        return None
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{what} is longer than {MAX_TEXT} characters")
    if not is_text(value):
        raise BadRequest(f"{what} is not valid UTF-8 text")
    return value


def secret_bytes(value: str | None) -> bytes:
    """A credential as the bytes that came on the wire (invalid UTF-8 included): compared, never stored."""
    return value.encode("utf-8", "surrogateescape") if value else b""


def request_meta(request: web.BaseRequest, wanted: Mapping[str, RequestValue]) -> dict[str, str]:
    """The request values an adapter declared (REQUEST_META), each checked with `short_text`."""
    out: dict[str, str] = {}
    for name, where in wanted.items():
        if isinstance(where, Header):
            value = short_text(request.headers.get(where.name), f"header {where.name}")
        else:
            value = short_text(request.query.get(where.name), f"query parameter {where.name}")
        if value is not None:
            out[name] = value
    return out
