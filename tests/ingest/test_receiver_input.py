"""Bad input is a 4xx with a JSON reason, never a 5xx: real HTTP, real broker.

The requests are written byte by byte on a socket, so header values can be what no HTTP client would
send (invalid UTF-8, 300-character values, control bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_from_bytes

import orjson
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rigs.fixtures import TENANTS
from rigs.kafka import read_records, wait_for

from pipeline.config import Settings
from pipeline.records import RawHeaders

WEBENGAGE_SECRET = hashlib.md5(b"~acme1234:whsec_acme").hexdigest().encode()
SEGMENT_SECRET = b"seg_shared_acme"
ALLOWED = {200, 400, 401, 413, 429, 503}

# path -> (query, headers) that authenticate tenant acme
ROUTES: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]] = {
    "/server/v4": (b"", [(b"X-API-KEY", b"wk_acme_1")]),
    "/segment/v4": (b"", [(b"X-API-KEY", b"wk_acme_1")]),
    "/v3/moengage": (b"", [(b"X-API-KEY", b"wk_acme_1")]),
    "/amplitude/v4": (b"", [(b"X-API-KEY", b"wk_acme_1")]),
    "/clevertap/v4": (b"", [(b"X-API-KEY", b"wk_acme_1")]),
    "/webengage/v4": (b"licenseCode=~acme1234&secret=" + WEBENGAGE_SECRET, []),
    "/api/v1/s2s/event": (b"token=ak_acme.st_acme", []),
    "/rewards/v1": (b"", [(b"X-API-KEY", b"rk_acme_1")]),
}
GETS = ["/healthz", "/readyz", "/metrics"]


async def raw_request(
    port: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 request written as bytes; returns status, headers (lower-case names) and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        head += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        writer.write(head + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    answer_headers = {}
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        answer_headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer_headers, payload


def fuzz_settings(make_settings: Callable[..., Settings]) -> Settings:
    tenants: list[dict[str, Any]] = [dict(t) for t in TENANTS]
    tenants[0]["segment_shared_secret"] = SEGMENT_SECRET.decode()
    return make_settings(receiver={"port": 0, "max_body_bytes": 4096}, tenants=tenants)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


header_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_names = st.one_of(
    st.sampled_from(
        [
            b"Content-Type",
            b"X-API-KEY",
            b"X-Signature",
            b"x-request-id",
            b"X-Auth-Token",
            b"Content-Encoding",
            b"Transfer-Encoding",
            b"Expect",
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20).map(str.encode),
    st.binary(min_size=1, max_size=20).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b"")
    ),
)
query_parts = st.lists(
    st.tuples(
        st.sampled_from([b"licenseCode", b"secret", b"token", b"eventType", b"x"]) | st.binary(max_size=10),
        st.binary(max_size=300),
    ),
    max_size=4,
).map(
    lambda pairs: b"&".join(
        quote_from_bytes(k).encode() + b"=" + quote_from_bytes(v).encode() for k, v in pairs
    )
)
raw_query = st.binary(max_size=50).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E and c not in b"#"))
bodies = st.one_of(
    st.binary(max_size=5000),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ).map(orjson.dumps),
    st.integers(min_value=0, max_value=1200).map(lambda depth: b"[" * depth + b"]" * depth),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[bytes, bytes]], bytes]:
    """A request to any endpoint: its credentials kept, dropped or garbled, plus arbitrary
    headers/query/body."""
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(GETS))
        return (
            "GET",
            path.encode() + b"?" + draw(raw_query),
            draw(st.lists(st.tuples(header_names, header_bytes), max_size=4)),
            b"",
        )
    path = draw(st.sampled_from(sorted(ROUTES)))
    query, headers = ROUTES[path]
    headers = list(headers) if draw(st.booleans()) else []
    query = query if draw(st.booleans()) else b""
    extra = draw(query_parts | raw_query)
    query = b"&".join(q for q in (query, extra) if q)
    headers += draw(st.lists(st.tuples(header_names, header_bytes), max_size=5))
    body = draw(bodies)
    if path == "/segment/v4" and draw(st.booleans()):
        headers.append((b"X-Signature", hmac.new(SEGMENT_SECRET, body, hashlib.sha1).hexdigest().encode()))
    target = path.encode() + (b"?" + query if query else b"")
    return "POST", target, headers, body


def stored_request_ids(settings: Settings) -> list[str]:
    topics = [
        settings.topics.raw(path)
        for path in ("customerglu", "segment", "moengage", "amplitude", "clevertap", "webengage", "usermaven")
    ]
    ids = []
    for topic in topics:
        ids += [RawHeaders.from_kafka(r.headers).request_id for r in read_records(settings, topic)]
    # A reward array is one request stored as one record per reward, all with the request's id.
    rewards = read_records(settings, settings.topics.rewards)
    return ids + sorted({RawHeaders.from_kafka(r.headers).request_id for r in rewards})


def test_fuzzed_requests_on_every_endpoint_get_only_200_4xx_or_503_and_refusals_store_nothing(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """Hypothesis over header names and values, query strings and bodies on every endpoint: the status is
    always one of 200/400/401/413/429/503, refusals carry a JSON reason, and only the 200s are stored."""
    settings = fuzz_settings(make_settings)
    port = port_of(start_receiver(settings))
    accepted: list[str] = []
    seen: set[int] = set()

    @hypothesis_settings(
        max_examples=400,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(requests())
    def one(request: tuple[str, bytes, list[tuple[bytes, bytes]], bytes]) -> None:
        method, target, headers, body = request
        status, answer_headers, payload = run(raw_request(port, method, target, headers, body))
        seen.add(status)
        assert status in ALLOWED | ({404, 405} if method == "GET" else set()), (status, payload[:200])
        if method == "POST" and status == 200:
            accepted.append(answer_headers[b"x-request-id"].decode())
        elif method == "POST" and status in {401, 413, 429, 503} | ({400} if b"error" in payload else set()):
            assert payload.startswith(b"{"), payload[:200]

    one()
    assert 200 in seen and 401 in seen
    stored = wait_for(lambda: len(ids := stored_request_ids(settings)) >= len(accepted) and ids, timeout=60)
    assert sorted(stored) == sorted(accepted)


def test_header_values_over_our_limits_or_not_text_get_400_and_credentials_401(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """Content-Type or WebEngage x-request-id over 256 characters, or not UTF-8: 400 with a JSON reason;
    invalid UTF-8 in X-API-KEY or a token and a non-ASCII X-Signature: 401. Nothing is stored."""
    settings = fuzz_settings(make_settings)
    port = port_of(start_receiver(settings))
    key = [(b"X-API-KEY", b"wk_acme_1")]
    webengage = b"/webengage/v4?licenseCode=~acme1234&secret=" + WEBENGAGE_SECRET
    cases = [
        (b"/server/v4", key + [(b"Content-Type", b"a" * 300)], 400),
        (b"/server/v4", key + [(b"Content-Type", b"application/\xff\xfe")], 400),
        (webengage, [(b"x-request-id", b"r" * 300)], 400),
        (webengage, [(b"x-request-id", b"\xc3(")], 400),
        (b"/server/v4", [(b"X-API-KEY", b"wk_acme_\xff")], 401),
        (b"/rewards/v1", [(b"X-API-KEY", b"\xff\xfe")], 401),
        (b"/api/v1/s2s/event", [(b"X-Auth-Token", b"ak_acme.\xff")], 401),
        (b"/api/v1/s2s/event?token=ak_acme.%ff", [], 401),
        (b"/webengage/v4?licenseCode=~acme1234&secret=%ff%fe", [], 401),
        (b"/segment/v4", key + [(b"X-Signature", "é".encode() * 20)], 401),
        (b"/segment/v4", key + [(b"X-Signature", b"\xff" * 40)], 401),
    ]
    for target, headers, expected in cases:
        status, _, payload = run(raw_request(port, "POST", target, headers, b'{"a":1}'))
        assert (status, orjson.loads(payload)["status"]) == (expected, "error"), (target, headers, payload)
    assert run(raw_request(port, "POST", b"/server/v4", key, b"marker"))[0] == 200
    records = wait_for(lambda: read_records(settings, settings.topics.raw("customerglu")))
    assert [r.value for r in records] == [b"marker"]
    assert read_records(settings, settings.topics.raw("webengage")) == []
