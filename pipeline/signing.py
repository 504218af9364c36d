"""Reward webhook bodies and their signatures (docs/sources.md §5).

The body is compact UTF-8 JSON in a stable key order, so a receiver that re-serializes the parsed JSON
(the vendor's sample verifiers: `JSON.stringify(req.body)`, `json.dumps(obj, separators=(',', ':'))`)
reproduces our exact bytes and therefore our `X-CG-SIGNATURE`. The optional Standard Webhooks headers
(https://www.standardwebhooks.com) add a timestamp and message id to the signed content, so receivers
can reject replays; several secrets may sign at once for key rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Body fields in the order of docs/sources.md §5's table: the order our bodies use.
FIELD_ORDER = ("campaignId", "type", "userId", "rewardId", "rewardName", "rewardAmount", "code", "details")
SIGNATURE_HEADER = "X-CG-SIGNATURE"
WHSEC_PREFIX = "whsec_"
_MAX_ARRAY_INDEX = 2**32 - 2


# --- the body ----------------------------------------------------------------------------------------


def canonical_body(reward: Mapping[str, Any]) -> bytes:
    """The exact bytes we send: spec key order, compact separators, raw UTF-8, integers as integers.

    Known fields come in FIELD_ORDER, other keys after them in sorted order. Inside every object, keys
    that JavaScript treats as array indices ("0", "17") go first in numeric order, because
    `JSON.parse` + `JSON.stringify` moves them there: a Node verifier then still matches.
    """
    known = [k for k in FIELD_ORDER if k in reward]
    extra = sorted(k for k in reward if k not in FIELD_ORDER)
    ordered = {k: _normalize(reward[k]) for k in _js_key_order(known + extra)}
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _normalize(value: Any) -> Any:
    """Integral floats become ints (`15.0` -> `15`, as `JSON.stringify` does); objects get JS key order."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        return value
    if isinstance(value, Mapping):
        return {k: _normalize(value[k]) for k in _js_key_order(list(value))}
    if isinstance(value, Sequence):
        return [_normalize(v) for v in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _js_key_order(keys: list[str]) -> list[str]:
    """ECMAScript property order: array-index keys ascending, then the rest in their given order."""
    indices = sorted((k for k in keys if _is_array_index(k)), key=int)
    return indices + [k for k in keys if not _is_array_index(k)]


def _is_array_index(key: str) -> bool:
    if key == "0":
        return True
    return key.isascii() and key.isdigit() and key[0] != "0" and int(key) <= _MAX_ARRAY_INDEX


# --- X-CG-SIGNATURE ------------------------------------------------------------------------------------


def cg_signature(body: bytes, token: str) -> str:
    """Lowercase hex HMAC-SHA1 of the exact body bytes, keyed with the token's UTF-8 bytes (40 chars)."""
    return hmac.new(token.encode("utf-8"), body, hashlib.sha1).hexdigest()


def verify_signature(body: bytes, header: str, token: str) -> bool:
    """True when `header` is the X-CG-SIGNATURE of the raw `body` under `token` (constant-time compare)."""
    expected = cg_signature(body, token).encode("ascii")
    given = header.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(expected, given)


# --- Standard Webhooks ---------------------------------------------------------------------------------


def whsec_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError when it is not in that form."""
    if not secret.startswith(WHSEC_PREFIX):
        raise ValueError("a Standard Webhooks secret has the form whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(WHSEC_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("the part after whsec_ is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a Standard Webhooks secret decodes to 24..64 bytes")
    return key


def standard_signature(msg_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """`v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>` for one secret."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(whsec_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def standard_headers(
    msg_id: str, body: bytes, secrets: Iterable[str], timestamp: int | None = None
) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature (one space-separated `v1,...` per secret)."""
    when = int(time.time()) if timestamp is None else timestamp
    signatures = " ".join(standard_signature(msg_id, when, body, s) for s in secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(when), "webhook-signature": signatures}


def verify_standard(
    body: bytes, headers: Mapping[str, str], secret: str, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """True when any `v1` signature matches and the timestamp is within `tolerance_s` (replay guard)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp = lowered.get("webhook-id", ""), lowered.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_s:
        return False
    expected = standard_signature(msg_id, int(stamp), body, secret).encode()
    candidates = [c.encode("utf-8", "replace") for c in lowered.get("webhook-signature", "").split()]
    return any(hmac.compare_digest(expected, c) for c in candidates)
