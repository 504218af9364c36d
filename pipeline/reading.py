"""Shared field readers for adapters: the parsing rules of docs/sources.md §3.1–3.4, as pure functions.

Vendor JSON arrives untyped (`JSONValue`); this is the one module that narrows it. Every reader
either returns a clean value or calls `reject()` with a §3.6 code and the field's dotted path.
A `field` may be dotted (`user.id`) to reach into nested objects.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Final

import orjson

from pipeline import reasons
from pipeline.adapting import JSONObject, JSONValue, reject

MAX_EVENT_ID_CHARS: Final = 256
# orjson reads ~1,024 levels but refuses to write 255 or more; a canonical event nests a body's values
# at most 4 levels deeper (context.vendor.extra), a dead letter 1 level: 128 keeps every output writable.
MAX_JSON_DEPTH: Final = 128


class _Missing:
    """A path step that is absent (distinct from an explicit JSON null)."""


_MISSING: Final = _Missing()
_CONTAINERS: Final = (dict, list)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# §3.4 rule 1: the unit is chosen by the magnitude of |n|, in this order.
_EPOCH_UNITS: Final = ((Decimal("1e11"), 10**6), (Decimal("1e14"), 10**3), (Decimal("1e17"), 1))
_EPOCH_INT_UNITS: Final = ((10**11, 10**6), (10**14, 10**3), (10**17, 1))
# [0-9], not \d: \d also matches non-ASCII digits such as "٣".
_DIGITS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_CLEVERTAP_DATE = re.compile(r"\$D_(-?[0-9]+)")
_ISO = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[T ]"
    r"(?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.(?P<fraction>[0-9]+))?)?)"
    r"(?P<zone>Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
# The form nearly every vendor sends (seconds, at most 6 fraction digits, a zone), which
# datetime.fromisoformat reads exactly as _from_iso would: one match and one call, not _ISO's groups.
_ISO_COMMON = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:?[0-9]{2})"
)


UTF8_BOM = b"\xef\xbb\xbf"


def json_body(body: bytes) -> JSONValue:
    """Decode a request body; anything orjson refuses (bad JSON, bad UTF-8) is invalid_json, and nesting
    deeper than MAX_JSON_DEPTH is nesting_too_deep (its outputs could not be written).

    A UTF-8 byte-order mark before the JSON is ignored (RFC 8259 allows a parser to); the raw record keeps
    it. In an object with a key twice, the last value wins, as in the common parsers."""
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM) :]
    try:
        doc: JSONValue = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reject(reasons.INVALID_JSON, f"body is not valid JSON: {exc}")
    # Each level needs an opening bracket: a body with few of them cannot be too deep (the common case).
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and not nests_within(doc, MAX_JSON_DEPTH):
        reject(
            reasons.NESTING_TOO_DEEP,
            f"the body nests arrays/objects more than {MAX_JSON_DEPTH} levels deep",
        )
    return doc


def json_depth(value: JSONValue) -> int:
    """How many arrays/objects deep a value nests (a scalar is 0), without recursion: level by level,
    keeping only the containers of each level (several times faster than a stack of (node, depth))."""
    depth = 0
    level: list[dict[str, JSONValue] | list[JSONValue]] = [value] if isinstance(value, dict | list) else []
    while level:
        depth += 1
        below: list[dict[str, JSONValue] | list[JSONValue]] = []
        for node in level:
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, _CONTAINERS):
                    below.append(child)
        level = below
    return depth


def nests_within(value: JSONValue, limit: int) -> bool:
    """Whether json_depth(value) <= limit, at orjson's speed (a tenth of json_depth's walk on a bulk body).

    orjson refuses to write more than `_writable_depth()` levels, and writes everything it reads except
    deeper nesting. So wrapped in (writable depth - limit) arrays, the value is writable exactly when it
    nests at most `limit` levels. If orjson refuses for any other reason, json_depth decides.
    """
    padding = _writable_depth() - limit
    if padding >= 0 and _writable(_wrapped(value, padding)):
        return True
    return json_depth(value) <= limit


@functools.cache
def _writable_depth() -> int:
    """The deepest nesting orjson writes (254 in orjson 3.x), found by trying, so that a release of orjson
    cannot move it under nests_within; -1 if orjson writes 1,024 levels (nests_within then walks)."""
    if _writable(_wrapped(None, 1024)):
        return -1
    writable, refused = 0, 1024
    while refused - writable > 1:
        middle = (writable + refused) // 2
        writable, refused = (middle, refused) if _writable(_wrapped(None, middle)) else (writable, middle)
    return writable


def _wrapped(value: JSONValue, levels: int) -> JSONValue:
    """The value inside `levels` one-element arrays."""
    for _ in range(levels):
        value = [value]
    return value


def _writable(value: JSONValue) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def kind(value: JSONValue) -> str:
    """The JSON name of a value's type, for reject details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def as_object(value: JSONValue, what: str) -> JSONObject:
    """A body or batch element that must be a JSON object; anything else is unexpected_body_shape."""
    if not isinstance(value, dict):
        reject(reasons.UNEXPECTED_BODY_SHAPE, f"expected {what} to be a JSON object, got {kind(value)}")
    return value


def get(record: Mapping[str, JSONValue], field: str) -> JSONValue:
    """The value at a dotted path, or None when any step is absent or null.

    A step that is present but not an object is wrong_type:<that step>, rather than silently absent.
    """
    if "." not in field:  # the common case: absent and null are both None
        return record.get(field)
    value = _get(record, field)
    return None if isinstance(value, _Missing) else value


def identifier(record: Mapping[str, JSONValue], field: str) -> str | None:
    """A user id, anonymous id or vendor event id (§3.1): trimmed string or integer, else absent."""
    value = get(record, field)
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    reject(
        reasons.WRONG_TYPE.about(field),
        f"{field} must be a string or an integer, got {kind(value)}",
        path=field,
    )


def event_id(record: Mapping[str, JSONValue], *fields: str) -> str | None:
    """The first present vendor event id among `fields` (§3.1); None means: fingerprint it (§3.5)."""
    for field in fields:
        found = identifier(record, field)
        if found is not None:
            if len(found) > MAX_EVENT_ID_CHARS:
                reject(
                    reasons.INVALID_EVENT_ID,
                    f"{field} is {len(found)} characters long, the limit is {MAX_EVENT_ID_CHARS}",
                    path=field,
                )
            return found
    return None


def event_name(record: Mapping[str, JSONValue], *fields: str) -> str:
    """The first present event name among `fields` (§3.2): a non-blank JSON string, kept verbatim.

    A blank or absent field falls through to the next one (MoEngage event_name -> event_code); a
    non-string does not.
    """
    for field in fields:
        value = get(record, field)
        if value is None:
            continue
        if not isinstance(value, str):
            reject(
                reasons.WRONG_TYPE.about(field), f"{field} must be a string, got {kind(value)}", path=field
            )
        if value.strip():
            return value
    reject(reasons.MISSING_EVENT_NAME, f"no event name in {' / '.join(fields)}", path=fields[0])


def container(record: Mapping[str, JSONValue], field: str) -> JSONObject:
    """A properties/traits/context source (§3.3): an object (shallow copy), {} when absent or null."""
    value = get(record, field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        reject(reasons.WRONG_TYPE.about(field), f"{field} must be an object, got {kind(value)}", path=field)
    return dict(value)


def timestamp(record: Mapping[str, JSONValue], *fields: str, required: bool) -> datetime | None:
    """The event time from the first non-missing field (§3.4), as an aware UTC datetime.

    An invalid first value is invalid_timestamp: we never fall through to the next field, so a
    broken client clock field cannot be papered over by a server time.
    """
    for field in fields:
        value = get(record, field)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        moment = parse_timestamp(value)
        if moment is None:
            reject(
                reasons.INVALID_TIMESTAMP, f"{field} is not a supported time: {_preview(value)}", path=field
            )
        return moment
    if required:
        reject(reasons.MISSING_TIMESTAMP, f"none of {' / '.join(fields)} is present", path=fields[0])
    return None


def parse_timestamp(value: JSONValue) -> datetime | None:
    """One non-missing §3.4 value as an aware UTC datetime, or None when it is invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return _from_epoch_int(value)
    if isinstance(value, float):
        # repr() is the shortest text that round-trips, i.e. what the JSON said.
        return _from_epoch(Decimal(repr(value))) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    if _ISO_COMMON.fullmatch(value):
        return _from_common_iso(value)
    if _DIGITS.fullmatch(value):
        return _from_epoch(Decimal(value))
    if match := _CLEVERTAP_DATE.fullmatch(value):
        return _from_epoch(Decimal(match[1]))
    if match := _ISO.fullmatch(value):
        return _from_iso(match)
    return None


def leftovers(record: Mapping[str, JSONValue], mapped_keys: Collection[str]) -> JSONObject:
    """The top-level keys no mapping consumed, for context.vendor (§2)."""
    return {key: value for key, value in record.items() if key not in mapped_keys}


def get_folded(record: Mapping[str, JSONValue], key: str) -> JSONValue:
    """`record[key]` matched case-insensitively, exact spelling first; None when absent.

    CleverTap's own samples disagree on casing (Identity/identity, ObjectId/objectId, §4.5).
    """
    found = _folded_key(record, key)
    return None if found is None else record[found]


def fold_keys(record: Mapping[str, JSONValue], keys: Iterable[str]) -> JSONObject:
    """A copy of `record` with each of `keys` found case-insensitively and renamed to that spelling: the
    exact spelling first, else the first key of the record that folds to it (as `_folded_key` finds it).

    The record's keys are folded once, when the first key is not there as spelt (CleverTap profiles are
    looked up for a dozen keys, most of them absent), not once per key looked up."""
    out = dict(record)
    spellings: dict[str, str] | None = None  # folded -> the record's first key that folds to it
    renamed: set[str] = set()  # folded names already renamed: keys that fold alike are looked up in `out`
    for key in keys:
        if key in out:
            continue
        folded = key.casefold()
        if folded in renamed:
            found = _folded_key(out, key)
        else:
            if spellings is None:
                spellings = {}
                for name in record:
                    spellings.setdefault(name.casefold(), name)
            found = spellings.get(folded)
        if found is not None:
            out[key] = out.pop(found)
            renamed.add(folded)
    return out


def _folded_key(record: Mapping[str, JSONValue], key: str) -> str | None:
    if key in record:
        return key
    wanted = key.casefold()
    return next((k for k in record if k.casefold() == wanted), None)


def _get(record: Mapping[str, JSONValue], field: str) -> JSONValue | _Missing:
    if "." not in field:  # the common case, without the split
        return record.get(field, _MISSING)
    steps = field.split(".")
    node: JSONValue | _Missing = record.get(steps[0], _MISSING)
    for depth in range(1, len(steps)):
        if node is None or isinstance(node, _Missing):
            return _MISSING
        if not isinstance(node, dict):
            parent = ".".join(steps[:depth])
            reject(
                reasons.WRONG_TYPE.about(parent), f"{parent} must be an object, got {kind(node)}", path=parent
            )
        node = node.get(steps[depth], _MISSING)
    return node


def _from_epoch(number: Decimal) -> datetime | None:
    """§3.4 rule 1: seconds below 1e11, milliseconds below 1e14, microseconds below 1e17."""
    for limit, micros_per_unit in _EPOCH_UNITS:
        if abs(number) < limit:
            micros = int((number * micros_per_unit).to_integral_value(rounding=ROUND_FLOOR))
            try:
                return _EPOCH + timedelta(microseconds=micros)
            except OverflowError:  # before year 1: not representable, so not a time
                return None
    return None


def _from_epoch_int(number: int) -> datetime | None:
    """_from_epoch of an integer in integer arithmetic: the same instant (Decimal is exact on integers
    of this size), without Decimal's cost (MoEngage and Usermaven times are integers)."""
    magnitude = abs(number)
    for limit, micros_per_unit in _EPOCH_INT_UNITS:
        if magnitude < limit:
            try:
                return _EPOCH + timedelta(microseconds=number * micros_per_unit)
            except OverflowError:  # before year 1: not representable, so not a time
                return None
    return None


def _from_common_iso(text: str) -> datetime | None:
    """A time of the _ISO_COMMON form; the same instant _from_iso gives (tests/pipeline/test_reading.py)."""
    try:
        parsed = datetime.fromisoformat(text)
        return parsed if parsed.tzinfo is UTC else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # month 13, 24:00, an offset of 24 h, year 1 shifted below 1...
        return None


def _from_iso(match: re.Match[str]) -> datetime | None:
    """§3.4 rule 4, once the regex has gated the form: fraction truncated to µs, no zone means UTC."""
    time, _, fraction = match["time"].partition(".")
    text = match["date"] + "T" + time + (f".{fraction[:6]}" if fraction else "")
    zone = match["zone"] or "+00:00"
    try:
        parsed = datetime.fromisoformat(text + zone)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # month 13, 24:00, offset of 24h, year 1 shifted below 1...
        return None


def _preview(value: JSONValue) -> str:
    text = repr(value) if isinstance(value, str | int | float) else kind(value)
    return text if len(text) <= 80 else text[:77] + "..."
