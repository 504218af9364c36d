"""The thin receiver against a real broker over real HTTP (docs/sources.md §1, §1.1)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from rigs.kafka import read_records, start_local_broker, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.records import RawHeaders

WEBENGAGE_SECRET = hashlib.md5(b"~acme1234:whsec_acme").hexdigest()

# source -> (path, query, headers) of a correctly authenticated request for tenant "acme"
REQUESTS: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "customerglu": ("/server/v4", {}, {"X-API-KEY": "wk_acme_1"}),
    "segment": ("/segment/v4", {}, {"x-api-key": "wk_acme_1"}),
    "moengage": ("/v3/moengage", {}, {"X-API-KEY": "wk_acme_1"}),
    "amplitude": ("/amplitude/v4", {}, {"X-API-KEY": "wk_acme_1"}),
    "clevertap": ("/clevertap/v4", {}, {"X-API-KEY": "wk_acme_1"}),
    "webengage": (
        "/webengage/v4",
        {"licenseCode": "~acme1234", "secret": WEBENGAGE_SECRET, "eventType": "push_accepted"},
        {"x-request-id": "a1b2c3"},
    ),
    "usermaven": ("/api/v1/s2s/event", {"token": "ak_acme.st_acme"}, {}),
}
BAD_AUTH: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "customerglu": ({}, {"X-API-KEY": "nope"}),
    "segment": ({}, {}),
    "moengage": ({}, {"X-API-KEY": ""}),
    "amplitude": ({}, {"X-API-KEY": "wk_acme_1x"}),
    "clevertap": ({}, {"Authorization": "wk_acme_1"}),
    "webengage": ({"licenseCode": "~acme1234", "secret": "0" * 32}, {}),
    "usermaven": ({"token": "ak_acme.wrong"}, {}),
}


async def post(
    url: str, body: bytes, query: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=body, params=query, headers={"Content-Type": "application/json", **(headers or {})}
        ) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


def send(base: str, source: str, body: bytes, **overrides: Any) -> tuple[int, CIMultiDict[str], bytes]:
    path, query, headers = REQUESTS[source]
    return asyncio.run(
        post(
            base + overrides.get("path", path),
            body,
            overrides.get("query", query),
            overrides.get("headers", headers),
        )
    )


@pytest.mark.parametrize("source", sorted(REQUESTS))
def test_valid_request_lands_in_its_raw_topic_byte_for_byte(
    source: str, settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """A valid request is one record on raw.<source>: the exact body, with tenant/source/time/id headers."""
    base = start_receiver(settings)
    body = '{"event_name":  "x", "ü":"ß",\n "n": 1.50}'.encode()
    status, response_headers, response_body = send(base, source, body)
    assert (status, response_body) == (200, b'{"status":"ok"}')
    [record] = wait_for(lambda: read_records(settings, settings.topics.raw(source)))
    assert record.value == body
    headers = RawHeaders.from_kafka(record.headers)
    assert (headers.tenant, headers.source, headers.content_type) == ("acme", source, "application/json")
    assert headers.request_id == response_headers["X-Request-Id"]
    assert headers.received_at.tzinfo is not None
    if source == "webengage":
        assert headers.vendor == {
            "request_id": "a1b2c3",
            "event_type": "push_accepted",
            "license_code": "~acme1234",
        }
    if source == "usermaven":
        assert headers.vendor == {
            "api_key": "ak_acme",
            "token_sha256": hashlib.sha256(b"ak_acme.st_acme").hexdigest(),
        }
    stored = b"".join(k.encode() + v for k, v in record.headers)
    for secret in (b"wk_acme_1", b"st_acme", WEBENGAGE_SECRET.encode(), b"whsec_acme"):
        assert secret not in stored, "credentials are never stored"


@pytest.mark.parametrize("source", sorted(BAD_AUTH))
def test_bad_credentials_get_401_and_write_nothing(
    source: str, settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """Unknown or missing credentials: 401 with a JSON error, and nothing reaches Kafka (docs/sources.md
    §1)."""
    base = start_receiver(settings)
    query, headers = BAD_AUTH[source]
    status, _, body = send(base, source, b'{"a":1}', query=query, headers=headers)
    assert status == 401
    assert b'"error"' in body
    ok_status, _, _ = send(base, source, b"marker")  # a good request after it, to know the topic is readable
    assert ok_status == 200
    records = wait_for(lambda: read_records(settings, settings.topics.raw(source)))
    assert [r.value for r in records] == [b"marker"]


def test_a_tenant_is_resolved_from_its_own_key(
    settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """The tenant comes from the credential lookup, never from the body (docs/sources.md §1.1)."""
    base = start_receiver(settings)
    assert send(base, "amplitude", b'{"tenant":"acme"}', headers={"X-API-KEY": "wk_globex_1"})[0] == 200
    [record] = wait_for(lambda: read_records(settings, settings.topics.raw("amplitude")))
    assert RawHeaders.from_kafka(record.headers).tenant == "globex"


def test_usermaven_accepts_a_trailing_slash_and_the_header_token(
    settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """`/api/v1/s2s/event/` is the same route, and X-Auth-Token works like ?token= (docs/sources.md §4.7)."""
    base = start_receiver(settings)
    assert send(base, "usermaven", b"[1]", path="/api/v1/s2s/event/", query={})[0] == 401
    assert (
        send(
            base,
            "usermaven",
            b"[2]",
            path="/api/v1/s2s/event/",
            query={},
            headers={"X-Auth-Token": "ak_globex.st_globex"},
        )[0]
        == 200
    )
    assert send(base, "usermaven", b"[3]", path="/api/v1/s2s/event/")[0] == 200
    records = wait_for(lambda: len(r := read_records(settings, settings.topics.raw("usermaven"))) == 2 and r)
    assert sorted(r.value for r in records) == [b"[2]", b"[3]"]


def test_a_usermaven_token_without_a_server_part_is_told_the_expected_form(
    settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """The API key alone (as the JavaScript SDK's README shows) gets 401 whose message names the form
    API_KEY.SERVER_TOKEN, known key or not; nothing is written."""
    base = start_receiver(settings)
    for token in ("ak_acme", "ak_unknown"):
        status, _, body = send(base, "usermaven", b"[]", query={"token": token})
        assert status == 401
        message = orjson.loads(body)["error"]
        assert "API_KEY.SERVER_TOKEN" in message and "server part" in message
    assert send(base, "usermaven", b"marker")[0] == 200
    records = wait_for(lambda: read_records(settings, settings.topics.raw("usermaven")))
    assert [r.value for r in records] == [b"marker"]


def test_oversize_body_gets_413_with_the_limit(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """A body over receiver.max_body_bytes is refused with 413 naming the limit, and not stored."""
    settings = make_settings(receiver={"port": 0, "max_body_bytes": 1000})
    base = start_receiver(settings)
    status, _, body = send(base, "customerglu", b"x" * 1001)
    assert status == 413 and b"1000" in body
    assert send(base, "customerglu", b"y" * 1000)[0] == 200
    records = wait_for(lambda: read_records(settings, settings.topics.raw("customerglu")))
    assert [len(r.value) for r in records] == [1000]


def test_non_json_body_is_still_stored(settings: Settings, start_receiver: Callable[[Settings], str]) -> None:
    """Validate late: the receiver stores a malformed body as is; the pipeline dead-letters it later."""
    base = start_receiver(settings)
    junk = b"\xff\xfe not json {"
    assert send(base, "segment", junk)[0] == 200
    [record] = wait_for(lambda: read_records(settings, settings.topics.raw("segment")))
    assert record.value == junk


def test_health_ready_and_metrics(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """/healthz and /readyz answer on the public port, which names no tenant and no pid; /metrics is on the
    operator port and counts requests by source, tenant and status."""
    settings = make_settings(receiver={"operator_port": free_port()})
    base = start_receiver(settings)
    operator = f"http://127.0.0.1:{settings.receiver.operator_port}"
    send(base, "customerglu", b"{}")
    send(base, "customerglu", b"{}", headers={})

    async def get(url: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.text()

    assert asyncio.run(get(base + "/healthz")) == (200, '{"status": "ok"}')
    assert asyncio.run(get(base + "/readyz"))[0] == 200
    assert asyncio.run(get(base + "/metrics"))[0] == 404
    assert '"pid"' in asyncio.run(get(operator + "/healthz"))[1]
    status, text = asyncio.run(get(operator + "/metrics"))
    assert status == 200
    assert 'headwater_receiver_requests_total{source="customerglu",status="200",tenant="acme"} 1.0' in text
    assert 'headwater_receiver_requests_total{source="customerglu",status="401",tenant="-"} 1.0' in text
    assert "headwater_receiver_produce_seconds_bucket" in text


def test_request_and_byte_counts_are_exact_at_every_scrape(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """The handler adds counts up in plain integers; each scrape still shows every request answered before
    it."""
    settings = make_settings(receiver={"operator_port": free_port()})
    base = start_receiver(settings)
    metrics_url = f"http://127.0.0.1:{settings.receiver.operator_port}/metrics"

    async def scrape() -> str:
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
            return await response.text()

    requests = 'headwater_receiver_requests_total{source="customerglu",status="200",tenant="acme"}'
    nbytes = 'headwater_receiver_body_bytes_total{source="customerglu",tenant="acme"}'
    assert send(base, "customerglu", b"{}", headers={})[0] == 401  # counted, but stores no bytes
    for sent in (3, 5):
        for _ in range(sent):
            assert send(base, "customerglu", b'{"n":12345}')[0] == 200
        text = asyncio.run(scrape())
        total = 3 if sent == 3 else 8
        assert f"{requests} {total:.1f}" in text and f"{nbytes} {11 * total:.1f}" in text
    assert 'headwater_receiver_requests_total{source="customerglu",status="401",tenant="-"} 1.0' in text
    assert 'headwater_receiver_body_bytes_total{source="customerglu",tenant="-"}' not in text


def test_in_flight_bound_answers_503_with_retry_after(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """At the in-flight bound the receiver sheds load with 503 + Retry-After instead of queueing."""
    settings = make_settings(receiver={"port": 0, "max_in_flight": 1, "linger_ms": 200})
    base = start_receiver(settings)
    path, query, headers = REQUESTS["customerglu"]

    async def burst() -> list[tuple[int, CIMultiDict[str], bytes]]:
        return await asyncio.gather(*(post(base + path, b"{}", query, headers) for _ in range(20)))

    results = asyncio.run(burst())
    statuses = [status for status, _, _ in results]
    assert 200 in statuses and 503 in statuses
    assert all(h.get("Retry-After") == "2" for s, h, _ in results if s == 503)
    stored = wait_for(lambda: read_records(settings, settings.topics.raw("customerglu")))
    assert len(stored) == statuses.count(200)


def test_concurrent_clients_every_acknowledged_request_is_stored_exactly_once(
    settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """2,000 requests from 50 concurrent clients: every 200 is in Kafka exactly once (by request id)."""
    base = start_receiver(settings)
    path, query, headers = REQUESTS["customerglu"]
    url = base + path

    async def client(session: aiohttp.ClientSession, n: int) -> list[str]:
        ids = []
        for i in range(40):
            body = f'{{"client":{n},"i":{i}}}'.encode()
            async with session.post(url, data=body, headers=headers) as response:
                if response.status == 200:
                    ids.append(response.headers["X-Request-Id"])
        return ids

    async def run() -> list[str]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:
            return [i for ids in await asyncio.gather(*(client(session, n) for n in range(50))) for i in ids]

    acknowledged = asyncio.run(run())
    assert len(acknowledged) == 2000
    records = wait_for(
        lambda: len(r := read_records(settings, settings.topics.raw("customerglu"))) >= 2000 and r
    )
    stored_ids = [RawHeaders.from_kafka(r.headers).request_id for r in records]
    assert sorted(stored_ids) == sorted(acknowledged)


def test_broker_outage_gives_503_then_recovers(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str], tmp_path: Path
) -> None:
    """With Kafka down the receiver answers 503 + Retry-After (not 200, not a hang); it recovers after."""
    broker = start_local_broker(tmp_path / "outage-kafka")
    try:
        settings = make_settings(
            kafka={"bootstrap_servers": broker.bootstrap, "partitions": 1},
            receiver={"port": 0, "ack_timeout_s": 2.0},
        )
        base = start_receiver(settings)
        assert send(base, "amplitude", b'{"before":1}')[0] == 200
        broker.down()
        outage = [send(base, "amplitude", f'{{"during":{i}}}'.encode()) for i in range(3)]
        assert [status for status, _, _ in outage] == [503, 503, 503]
        assert all(int(h["Retry-After"]) >= 1 for _, h, _ in outage)
        broker.up(bound_to_parent=True)
        wait_for(lambda: send(base, "amplitude", b'{"after":1}')[0] == 200, timeout=60, interval=1)
        values = {r.value for r in read_records(settings, settings.topics.raw("amplitude"))}
        assert {b'{"before":1}', b'{"after":1}'} <= values
    finally:
        broker.down()
