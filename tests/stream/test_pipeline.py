"""The pipeline end to end on a real broker: HTTP -> receiver -> worker -> events.canonical / events.dlq
."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from rigs.kafka import WorkerProcess, produce_raw, read_records, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.records import DeadLetter, RawHeaders

KEY = {"X-API-KEY": "wk_acme_1", "Content-Type": "application/json"}
WEBENGAGE_QUERY = {
    "licenseCode": "~acme1234",
    "secret": hashlib.md5(b"~acme1234:whsec_acme").hexdigest(),
    "eventType": "push",
}

# One request per source, each mixing good and bad items where the source batches.
# (path, query, headers, body, expected canonical event ids, expected dead-letter reasons)
REQUESTS: list[tuple[str, dict[str, str], dict[str, str], Any, set[str], list[str]]] = [
    (
        "/server/v4",
        {},
        KEY,
        {
            "event_id": "cg_1",
            "event_name": "kyc_completed",
            "user_id": "usr_501",
            "timestamp": "2024-03-01T12:00:00Z",
            "event_properties": {"level": "full"},
        },
        {"cg_1"},
        [],
    ),
    (
        "/segment/v4",
        {},
        KEY,
        [
            {
                "type": "track",
                "event": "Signup Completed",
                "messageId": "seg_1",
                "userId": "u_9",
                "timestamp": "2024-03-01T12:00:00.800Z",
            },
            {
                "type": "track",
                "event": "No Identity",
                "messageId": "seg_2",
                "timestamp": "2024-03-01T12:00:00Z",
            },
            {
                "type": "identify",
                "messageId": "seg_3",
                "userId": "u_9",
                "traits": {"plan": "pro"},
                "timestamp": "2024-03-01T12:00:01Z",
            },
        ],
        {"seg_1", "seg_3"},
        ["missing_user_identity"],
    ),
    (
        "/v3/moengage",
        {},
        KEY,
        {
            "app_name": "DemoApp",
            "source": "MOENGAGE",
            "moe_request_id": "r1",
            "events": [
                {
                    "event_name": "Email Clicked",
                    "event_uuid": "moe_1",
                    "event_time": 1709294400,
                    "uid": "u_9",
                },
                {
                    "event_name": "Email Opened",
                    "event_uuid": "moe_2",
                    "event_time": "yesterday",
                    "uid": "u_9",
                },
            ],
        },
        {"moe_1"},
        ["invalid_timestamp"],
    ),
    (
        "/amplitude/v4",
        {},
        KEY,
        {
            "$insert_id": "amp_1",
            "uuid": "x",
            "event_type": "Song Played",
            "user_id": "u_9",
            "event_time": "2024-03-01 12:00:00.000000",
            "event_properties": {"genre": "jazz"},
        },
        {"amp_1"},
        [],
    ),
    (
        "/clevertap/v4",
        {},
        KEY,
        {
            "targetId": 1700000001,
            "key_values": {"event_name": "Trial Started", "event_id": "ct_1"},
            "profiles": [{"identity": "u_9", "objectId": "__a1b2"}, {"email": "nobody@example.com"}],
        },
        {"ct_1"},
        ["missing_user_identity"],
    ),
    (
        "/webengage/v4",
        WEBENGAGE_QUERY,
        {"x-request-id": "we_1", "Content-Type": "application/json"},
        {
            "event_name": "push_notification_accepted",
            "event_time": "2024-03-01T12:00:00+0000",
            "license_code": "~acme1234",
            "user_id": "a@example.com",
            "event_data": {"result": "SUCCESS"},
        },
        {"we_1"},
        [],
    ),
    (
        "/api/v1/s2s/event",
        {"token": "ak_acme.st_acme"},
        {"Content-Type": "application/json"},
        [
            {
                "api_key": "ak_acme",
                "event_id": "um_1",
                "event_type": "signed_up",
                "_timestamp": 1709294400000,
                "user": {"id": "u_9"},
            },
            {"api_key": "ak_other", "event_id": "um_2", "event_type": "signed_up", "user": {"id": "u_9"}},
        ],
        {"um_1"},
        ["api_key_mismatch"],
    ),
    ("/server/v4", {}, KEY, "this is not json", set(), ["invalid_json"]),
]


def canonical(settings: Settings) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in read_records(settings, settings.topics.canonical)]


def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter.from_json(r.value) for r in read_records(settings, settings.topics.dlq)]


def test_every_source_end_to_end_with_good_and_bad_items(
    make_settings: Callable[..., Settings],
    start_receiver: Callable[[Settings], str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Each request becomes canonical events and/or dead letters; one bad item only dead-letters itself.
    The worker's web port shows it: /metrics counts them, the DLQ page lists the letters."""
    settings = make_settings(worker={"web_port": free_port()})
    base = start_receiver(settings)
    start_worker(settings)

    async def send_all() -> list[int]:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for path, query, headers, body, _, _ in REQUESTS:
                data = body.encode() if isinstance(body, str) else orjson.dumps(body)
                async with session.post(base + path, params=query, headers=headers, data=data) as response:
                    statuses.append(response.status)
            return statuses

    assert asyncio.run(send_all()) == [200] * len(REQUESTS)
    expected_ids = set().union(*(ids for *_, ids, _ in REQUESTS))
    expected_reasons = Counter(r for *_, reasons in REQUESTS for r in reasons)
    events = wait_for(lambda: len(e := canonical(settings)) >= len(expected_ids) and e, timeout=90)
    letters = wait_for(lambda: len(d := dead_letters(settings)) >= sum(expected_reasons.values()) and d)
    assert {e["event_id"] for e in events} == expected_ids
    assert len(events) == len(expected_ids)
    assert Counter(d.reason for d in letters) == expected_reasons
    assert all(e["tenant"] == "acme" and e["schema_version"] == 1 for e in events)
    by_id = {e["event_id"]: e for e in events}
    assert by_id["seg_3"]["event_name"] == "identify"
    assert by_id["we_1"]["timestamp"] == "2024-03-01T12:00:00.000000+00:00"
    assert by_id["ct_1"]["context"]["timestamp_source"] == "received_at"
    segment_letter = next(d for d in letters if d.source == "segment")
    assert (segment_letter.stage, segment_letter.index) == ("normalize", 1)
    assert segment_letter.element["messageId"] == "seg_2"
    parse_letter = next(d for d in letters if d.reason == "invalid_json")
    assert (parse_letter.stage, parse_letter.index, parse_letter.body) == ("parse", None, b"this is not json")

    web = f"http://127.0.0.1:{settings.worker.web_port}"
    metrics = asyncio.run(http_get(web + "/metrics"))
    assert f"headwater_worker_canonical_events_total {float(len(expected_ids))}" in metrics
    assert 'headwater_worker_dead_letters_total{reason="invalid_json",source="customerglu"} 1.0' in metrics
    lag = [line for line in metrics.splitlines() if line.startswith("headwater_worker_consumer_lag{")]
    assert any(f'topic="{settings.topics.keyed}"' in line for line in lag)
    assert any(f'topic="{settings.topics.raw("segment")}"' in line for line in lag)
    page = asyncio.run(http_get(web + "/?source=segment"))
    assert segment_letter.id in page and parse_letter.id not in page


async def http_get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, url
        return await response.text()


def test_a_dead_letter_rebuilds_the_original_request_byte_for_byte(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A dead letter carries the exact body, the raw headers and the record's coordinates
    (docs/architecture.md)."""
    body = b'\xef\xbb\xbf{"broken": \xff}'
    produce_raw(settings, "amplitude", [body])
    start_worker(settings)
    [letter] = wait_for(lambda: dead_letters(settings))
    [raw] = read_records(settings, settings.topics.raw("amplitude"))
    assert letter.body == raw.value == body
    assert base64.b64decode(letter.body_b64) == body
    assert letter.raw_headers() == RawHeaders.from_kafka(raw.headers)
    assert (letter.origin.topic, letter.origin.partition, letter.origin.offset) == (
        raw.topic,
        raw.partition,
        raw.offset,
    )
    assert letter.reason == "invalid_json" and letter.message


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])  # rocksdb:// now names the same table
def test_the_same_event_in_two_partitions_is_emitted_once_per_tenant(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], store: str
) -> None:
    """Dedup is on (tenant, event_id) across raw partitions; the same id from another tenant is its own
    event. With either dedup store."""
    settings = make_settings(dedup={"store": store})
    event = orjson.dumps(
        {"event_id": "dup_1", "event_name": "paid", "user_id": "u1", "timestamp": "2024-03-01T12:00:00Z"}
    )
    produce_raw(settings, "customerglu", [event], tenant="acme", partition=0)
    produce_raw(settings, "customerglu", [event], tenant="acme", partition=1)
    produce_raw(settings, "customerglu", [event], tenant="globex", partition=2)
    marker = orjson.dumps({"event_id": "marker", "event_name": "m", "user_id": "u1", "timestamp": 0})
    start_worker(settings)
    produce_raw(settings, "customerglu", [event], tenant="acme", partition=2)  # after the worker started
    produce_raw(settings, "customerglu", [marker], tenant="acme", partition=0)
    events = wait_for(lambda: len(e := canonical(settings)) >= 3 and e, timeout=90)
    wait_for(lambda: any(e["event_id"] == "marker" for e in canonical(settings)))
    events = canonical(settings)
    assert sorted((e["tenant"], e["event_id"]) for e in events) == [
        ("acme", "dup_1"),
        ("acme", "marker"),
        ("globex", "dup_1"),
    ]


def test_a_repeat_after_a_restart_is_dropped_by_the_table_restored_from_the_changelog(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """A new worker rebuilds the dedup table from the changelog (one record per transaction's ids), so an
    id emitted before the restart is still a duplicate after it."""
    settings = make_settings()
    bodies = [
        orjson.dumps({"event_id": f"r_{i}", "event_name": "paid", "user_id": "u1", "timestamp": i})
        for i in range(50)
    ]
    produce_raw(settings, "customerglu", bodies)
    worker = start_worker(settings)
    wait_for(lambda: len(canonical(settings)) >= 50, timeout=90)
    worker.stop()
    start_worker(settings)
    marker = orjson.dumps({"event_id": "marker", "event_name": "m", "user_id": "u1", "timestamp": 0})
    produce_raw(settings, "customerglu", [*bodies[:10], marker])
    wait_for(lambda: any(e["event_id"] == "marker" for e in canonical(settings)), timeout=90)
    assert sorted(e["event_id"] for e in canonical(settings)) == sorted(
        [f"r_{i}" for i in range(50)] + ["marker"]
    )


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_emits_nothing_twice(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """A worker SIGKILLed in the middle of 10,000 events and restarted: every event is canonical or
    dead-lettered, and no event_id is on events.canonical twice (docs/architecture.md "Guarantees")."""
    settings = make_settings(worker={"batch_max": 200})
    bodies = []
    for i in range(10_000):
        if i % 100 == 7:
            bodies.append(b"{not json")
        else:
            bodies.append(
                orjson.dumps(
                    {
                        "event_id": f"k_{i}",
                        "event_name": "tick",
                        "user_id": f"u{i % 97}",
                        "timestamp": 1709294400 + i,
                    }
                )
            )
    produce_raw(settings, "customerglu", bodies[:5000])
    worker = start_worker(settings)
    wait_for(
        lambda: len(read_records(settings, settings.topics.canonical)) >= 1500, timeout=120, interval=0.1
    )
    produce_raw(settings, "customerglu", bodies[5000:])
    worker.kill()
    start_worker(settings)
    expected_events = sum(1 for b in bodies if b != b"{not json")
    wait_for(
        lambda: (
            len(
                {orjson.loads(r.value)["event_id"] for r in read_records(settings, settings.topics.canonical)}
            )
            >= expected_events
        ),
        timeout=180,
        interval=1,
    )
    ids = [orjson.loads(r.value)["event_id"] for r in read_records(settings, settings.topics.canonical)]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    assert duplicates == []
    assert len(ids) == expected_events
    letters = {d.id for d in dead_letters(settings) if d.reason == "invalid_json"}
    assert len(letters) == 100  # each bad record once by id (a copy after the crash shares its id)


@pytest.mark.slow
def test_a_bulk_body_of_several_megabytes_is_carried_through(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A 4,000-event Segment batch of ~3 MB (over Kafka's default 1 MiB record limit) is stored raw,
    split into keyed records of bounded size, and every event comes out once."""
    padding = "x" * 600
    batch = [
        {
            "type": "track",
            "event": "Big",
            "messageId": f"big_{i}",
            "userId": f"u{i % 50}",
            "timestamp": "2024-03-01T12:00:00Z",
            "properties": {"padding": padding},
        }
        for i in range(4000)
    ]
    body = orjson.dumps(batch)
    assert len(body) > 2_500_000
    produce_raw(settings, "segment", [body])
    start_worker(settings)
    ids = wait_for(lambda: len(i := [e["event_id"] for e in canonical(settings)]) >= 4000 and i, timeout=120)
    assert sorted(ids) == sorted(f"big_{i}" for i in range(4000))
    keyed = read_records(settings, settings.topics.keyed)
    assert max(len(r.value) for r in keyed) < 300 * 1024
