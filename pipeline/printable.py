"""Outside text made safe to show on a terminal or in a line of a text log.

A sender's body, a tenant endpoint's response, a header value: any of them can hold ESC sequences (a
terminal obeys them: window titles, screen clears, fake lines) or newlines (a text log then shows lines the
process never wrote). Shown text goes through `printable` first: every C0 control but tab (and newline,
where the text is a multi-line body), DEL and every C1 control become a visible `\\xNN` escape.
"""

from __future__ import annotations

import re

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROLS_AND_NEWLINES = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` with control characters as `\\xNN` escapes (newlines kept only when asked)."""
    pattern = _CONTROLS if keep_newlines else _CONTROLS_AND_NEWLINES
    return pattern.sub(_escape, text)
