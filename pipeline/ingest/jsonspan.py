"""The exact bytes of the first element of a JSON array body, found without re-encoding anything.

Segment signs `JSON.stringify(data[0])` and sends `JSON.stringify(data)`, so the first element's bytes as
they stand in the body are exactly what was signed (issue 11, item 6).
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
