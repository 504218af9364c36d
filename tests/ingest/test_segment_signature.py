"""Segment's X-Signature without a bypass: real HTTP, real broker.

Segment's Webhook destination (`@segment/action-destinations`, webhook `extendRequest`) signs
`JSON.stringify(data[0])` and posts `JSON.stringify(data)`. `js_stringify` below is JSON.stringify for
the documents used here (compact separators, non-ASCII kept as UTF-8).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from rigs.fixtures import TENANTS
from rigs.kafka import read_records, wait_for

from pipeline.config import Settings
from pipeline.ingest.jsonspan import first_element

SECRET = b"seg_shared_acme"


def js_stringify(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def sign(data: bytes) -> str:
    return hmac.new(SECRET, data, hashlib.sha1).hexdigest()


def event(n: int) -> dict[str, Any]:
    return {
        "type": "track",
        "event": f"Order {n}",
        "messageId": f"m-{n}",
        "properties": {"note": 'say "hi" ]}'},
        "userId": "ü-1",
        "timestamp": "2024-03-01T12:00:00.000Z",
    }


def post(base: str, body: bytes, signature: str | None) -> int:
    headers = {"X-API-KEY": "wk_acme_1", "Content-Type": "application/json"}
    if signature is not None:
        headers["X-Signature"] = signature

    async def go() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(base + "/segment/v4", data=body, headers=headers) as response,
        ):
            return response.status

    return asyncio.run(go())


@pytest.fixture
def signed_settings(make_settings: Callable[..., Settings]) -> Settings:
    tenants: list[dict[str, Any]] = [dict(t) for t in TENANTS]
    tenants[0]["segment_shared_secret"] = SECRET.decode()
    return make_settings(tenants=tenants)


def test_a_real_signed_segment_batch_is_accepted_and_stored_byte_for_byte(
    signed_settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """A batch as Segment sends it (body = stringify(array), X-Signature over stringify(first element))
    gets 200, and so does a single object signed over its exact bytes."""
    base = start_receiver(signed_settings)
    batch = [event(1), event(2), event(3)]
    body = js_stringify(batch)
    assert post(base, body, sign(js_stringify(batch[0]))) == 200
    single = js_stringify(event(4))
    assert post(base, single, sign(single).upper()) == 200
    records = wait_for(
        lambda: len(r := read_records(signed_settings, signed_settings.topics.raw("segment"))) == 2 and r
    )
    assert sorted(r.value for r in records) == sorted([body, single])


@pytest.mark.parametrize(
    "case",
    [
        "unsigned array",
        "unsigned wrapped object",
        "signed over the second element",
        "first element tampered",
        "unsigned empty array",
        "wrong secret",
        "unsigned object",
        "object signed over other bytes",
    ],
)
def test_no_body_gets_in_unchecked_when_a_shared_secret_is_set(
    case: str, signed_settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """With a shared secret, unsigned or wrongly signed bodies get 401 whatever their shape, wrapping a
    body in [...] included, and nothing is stored."""
    base = start_receiver(signed_settings)
    one, two = js_stringify(event(1)), js_stringify(event(2))
    bodies: dict[str, tuple[bytes, str | None]] = {
        "unsigned array": (b"[" + one + b"," + two + b"]", None),
        "unsigned wrapped object": (b" [ " + one + b" ] ", None),
        "signed over the second element": (b"[" + one + b"," + two + b"]", sign(two)),
        "first element tampered": (b"[" + one.replace(b"Order 1", b"Order 9") + b"]", sign(one)),
        "unsigned empty array": (b"[]", None),
        "wrong secret": (b"[" + one + b"]", hmac.new(b"other", one, hashlib.sha1).hexdigest()),
        "unsigned object": (one, None),
        "object signed over other bytes": (one + b" ", sign(one)),
    }
    body, signature = bodies[case]
    assert post(base, body, signature) == 401
    assert post(base, one, sign(one)) == 200  # a good request after it, to know the topic is readable
    records = wait_for(lambda: read_records(signed_settings, signed_settings.topics.raw("segment")))
    assert [r.value for r in records] == [one]


def test_elements_after_the_first_are_not_covered_as_documented(
    signed_settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """Segment's scheme signs only the first element: a batch whose later elements differ from what was
    signed is accepted (the documented limit of the scheme, docs/sources.md §4.2)."""
    base = start_receiver(signed_settings)
    one = js_stringify(event(1))
    assert post(base, b"[" + one + b"," + js_stringify(event(666)) + b"]", sign(one)) == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'[{"a":"x]}\\"y"},2]', b'{"a":"x]}\\"y"}'),
        (b' \n[ "s\\\\", 3 ]', b'"s\\\\"'),
        (b"[12.5e3 , 1]", b"12.5e3"),
        (b"[[1,[2]],{}]", b"[1,[2]]"),
        (b"[]", None),
        (b'{"a":1}', None),
        (b"[{bad}]", None),
        (b'["unterminated', None),
    ],
)
def test_first_element_is_found_as_its_exact_bytes(body: bytes, expected: bytes | None) -> None:
    """The first element of an array body, exactly as it stands (strings with brackets and escapes)."""
    assert first_element(body) == expected


def test_a_signature_replayed_with_forged_events_after_its_first_element_is_refused(
    signed_settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """A captured batch's signature (over its first element) sent again with other events after that
    element gets 401; the same body again (a sender's retry) is accepted. Only the two originals are
    stored."""
    base = start_receiver(signed_settings)
    one = js_stringify(event(1))
    genuine = b"[" + one + b"," + js_stringify(event(2)) + b"]"
    assert post(base, genuine, sign(one)) == 200
    assert post(base, b"[" + one + b"," + js_stringify(event(666)) + b"]", sign(one)) == 401
    assert post(base, genuine, sign(one)) == 200
    records = wait_for(
        lambda: len(r := read_records(signed_settings, signed_settings.topics.raw("segment"))) == 2 and r
    )
    assert [r.value for r in records] == [genuine, genuine]


def test_a_tenant_may_refuse_arrays_signed_over_their_first_element_only(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """segment_refuse_arrays = true: an array signed over its first element gets 401; a single event and an
    array signed over the whole body get 200."""
    tenants: list[dict[str, Any]] = [dict(t) for t in TENANTS]
    tenants[0].update(segment_shared_secret=SECRET.decode(), segment_refuse_arrays=True)
    settings = make_settings(tenants=tenants)
    base = start_receiver(settings)
    one = js_stringify(event(1))
    batch = b"[" + one + b"," + js_stringify(event(2)) + b"]"
    assert post(base, batch, sign(one)) == 401
    assert post(base, one, sign(one)) == 200
    assert post(base, batch, sign(batch)) == 200
    records = wait_for(lambda: len(r := read_records(settings, settings.topics.raw("segment"))) == 2 and r)
    assert sorted(r.value for r in records) == sorted([one, batch])
