"""Exact bytes and counts of the items of a JSON body, found by scanning, without parsing or re-encoding.

Segment signs `JSON.stringify(data[0])` and sends `JSON.stringify(data)`, so the first element's bytes as
they stand in the body are exactly what was signed. A reward array's elements are
stored as their exact bytes. Items are counted while scanning, so a body over the item limit is refused
before any per-item work.
"""

from __future__ import annotations

import re

import orjson

_WHITESPACE = b" \t\r\n"
_SPECIAL = re.compile(rb'["\\\[\]{}]')
_SCALAR_END = re.compile(rb"[,\]\s]")


def first_element(body: bytes) -> bytes | None:
    """`body[start:end]` of the array's first element, or None when the body is not a non-empty array."""
    start = _skip_whitespace(body, 0)
    if body[start : start + 1] != b"[":
        return None
    start = _skip_whitespace(body, start + 1)
    if start >= len(body) or body[start : start + 1] == b"]":
        return None
    end = _value_end(body, start)
    if end is None:
        return None
    element = body[start:end]
    try:
        orjson.loads(element)
    except orjson.JSONDecodeError:
        return None
    return element


def _skip_whitespace(body: bytes, at: int) -> int:
    while at < len(body) and body[at] in _WHITESPACE:
        at += 1
    return at


def _value_end(body: bytes, start: int) -> int | None:
    """Index just past the JSON value that starts at `start` (structure only; orjson checks the rest)."""
    opener = body[start : start + 1]
    if opener not in (b"{", b"[", b'"'):
        match = _SCALAR_END.search(body, start)
        return match.start() if match else len(body)
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _SPECIAL.finditer(body, start):
        char, at = match.group(), match.start()
        if in_string:
            if char == b"\\" and escaped_at != at:
                escaped_at = at + 1  # the next byte is escaped
            elif char == b'"' and escaped_at != at:
                in_string = False
                if depth == 0:
                    return at + 1
        elif char == b'"':
            in_string = True
        elif char in (b"{", b"["):
            depth += 1
        elif char in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                return at + 1
    return None


# --- items: counted and cut while scanning, before any per-item work ----------------------------------

_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKENS_WITH_COMMAS = re.compile(_STRING + rb'|"|[\[\]{},]')  # a lone quote: an unterminated string
_TOKENS = re.compile(_STRING + rb'|"|[\[\]{}]')  # inside an item its commas do not matter
_EMPTY_ARRAY_REST = re.compile(rb"[ \t\r\n]*\]")
MAX_DEPTH = 1024  # deeper than JSON parsers accept (orjson's limit): such a body is not split


class TooManyItems(Exception):  # noqa: N818 - a verdict on the input
    """The body holds more items than the limit (counting stopped at limit + 1)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} items")
        self.limit = limit


def check_item_count(body: bytes, limit: int) -> None:
    """Raise TooManyItems when a batched body holds more than `limit` items: the elements of a top-level
    array, or of the arrays directly under a top-level object (summed: `events`, `profiles`, `batch`, ...),
    having scanned no further than the item past the limit. A body that is not well-formed JSON passes
    (the worker dead-letters it as one item). A body with fewer commas than the limit is not scanned.
    """
    if body.count(b",") >= limit:
        _scan(body, limit, counted_depths=(1, 2), spans=None)


def array_elements(body: bytes, limit: int) -> list[bytes] | None:
    """The exact bytes of each element of a top-level array (whitespace around them trimmed), or None
    when the body is not a well-formed JSON array. Raises TooManyItems past `limit` elements."""
    start = _skip_whitespace(body, 0)
    if body[start : start + 1] != b"[":
        return None
    spans: list[tuple[int, int]] = []
    if _scan(body, limit, counted_depths=(1,), spans=spans) < 0:
        return None
    return [body[a:b].strip(_WHITESPACE) for a, b in spans]


def _scan(
    body: bytes, limit: int, counted_depths: tuple[int, ...], spans: list[tuple[int, int]] | None
) -> int:
    """Walk the body's structure token by token (strings matched whole, in C); count the elements of the
    arrays at `counted_depths` whose parents are the top-level value; -1 (or 1 when only counting) when
    the body is not well-formed. Element spans at depth 1 go to `spans` when given."""
    malformed = -1 if spans is not None else 1
    stack = bytearray()  # b"[" / b"{" per open container
    counting = False  # inside an array whose commas separate items
    count = 0
    element_start = 0
    pos = 0
    pattern = _TOKENS
    while True:
        match = pattern.search(body, pos)
        if match is None:
            return count if not stack else malformed
        token = match.group()
        at = match.start()
        pos = match.end()
        first = token[0]
        if first == 0x22:  # '"'
            if len(token) == 1:
                return malformed
            continue
        if first == 0x2C:  # ','
            count += 1
            if count > limit:
                raise TooManyItems(limit)
            if spans is not None:
                spans.append((element_start, at))
                element_start = pos
            continue
        if first in (0x5B, 0x7B):  # '[' '{'
            depth = len(stack) + 1
            if depth > MAX_DEPTH:
                return malformed
            stack.append(first)
            counting = first == 0x5B and depth in counted_depths and (depth == 1 or stack[0] == 0x7B)
            if counting:
                if _EMPTY_ARRAY_REST.match(body, pos) is None:  # a non-empty array: its first item
                    count += 1
                    if count > limit:
                        raise TooManyItems(limit)
                element_start = pos
            pattern = _TOKENS_WITH_COMMAS if counting else _TOKENS
            continue
        # ']' or '}'
        if not stack or stack[-1] != (0x5B if first == 0x5D else 0x7B):
            return malformed
        if counting and spans is not None and at > element_start and body[element_start:at].strip():
            spans.append((element_start, at))
        stack.pop()
        depth = len(stack)
        counting = (
            depth > 0 and stack[-1] == 0x5B and depth in counted_depths and (depth == 1 or stack[0] == 0x7B)
        )
        pattern = _TOKENS_WITH_COMMAS if counting else _TOKENS
        if not stack and _skip_whitespace(body, pos) != len(body):
            return malformed
