"""Slow senders hold nothing for long: head and body deadlines, bytes
counted as they arrive, and a trickling tenant never keeps another tenant waiting. Real HTTP, real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from rigs.hostile import Answer, open_upload, parse_answer, steady_client, trickle
from rigs.kafka import read_records, wait_for

from pipeline.config import Settings

PATH = "/server/v4"


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_trickled_uploads_do_not_starve_another_tenant_and_end_with_408(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """Budget 4 MiB; acme opens 8 uploads announcing 1 MiB each and trickles a byte every 0.3 s. globex's
    60 sequential requests meanwhile all get 200 with a p99 under 0.5 s; every upload ends with 408 and a
    JSON reason once it falls under the minimum rate (1 KiB/s after a 1 s grace)."""
    settings = make_settings(
        receiver={
            "port": 0,
            "max_body_bytes": 1_048_576,
            "max_bytes_in_flight": 4_194_304,
            "body_grace_s": 1.0,
            "body_min_bytes_per_s": 1024,
            "body_timeout_s": 20.0,
        }
    )
    base = start_receiver(settings)
    port = port_of(base)

    async def run() -> tuple[list[Answer | None], list[int], float, float]:
        uploads = [await open_upload(port, PATH, "wk_acme_1", 1_048_576) for _ in range(8)]
        trickles = [asyncio.ensure_future(trickle(w, r, 0.3, 30)) for r, w in uploads]
        await asyncio.sleep(0.2)  # the uploads are admitted and trickling before globex starts
        steady = await steady_client(base + PATH, "wk_globex_1", 60)
        answers = list(await asyncio.gather(*trickles))
        return answers, steady.statuses, steady.quantile(0.99), steady.quantile(0.5)

    answers, statuses, p99, p50 = asyncio.run(run())
    print(f"trickle attack: the other tenant's p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert statuses == [200] * 60
    assert p99 < 0.5, p99
    for answer in answers:
        assert answer is not None and answer.status == 408, answer
        assert "bytes/s" in orjson.loads(answer.body)["error"]
        assert answer.headers["connection"] == "close"
    records = wait_for(
        lambda: len(r := read_records(settings, settings.topics.raw("customerglu"))) >= 60 and r
    )
    assert len(records) == 60  # nothing of the trickled uploads was stored


def test_a_head_that_never_completes_gets_408_and_the_connection_closes(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """head_timeout_s = 1: a request head trickled a byte at a time, and a connection that sends nothing,
    both get 408 with a JSON reason and are closed within a second or two."""
    settings = make_settings(receiver={"port": 0, "head_timeout_s": 1.0})
    port = port_of(start_receiver(settings))

    async def slow_head() -> tuple[Answer, float]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        reading = asyncio.ensure_future(reader.read())
        for byte in b"POST /server/v4 HTTP/1.1\r\nHost: x\r\nX-API-KEY: wk_acme_1\r\n":
            done, _ = await asyncio.wait({reading}, timeout=0.2)
            if done:
                break
            writer.write(bytes([byte]))
        raw = await asyncio.wait_for(reading, 10)
        writer.close()
        return parse_answer(raw), time.monotonic() - started

    async def silent() -> tuple[Answer, float]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return parse_answer(raw), time.monotonic() - started

    for answer, seconds in (asyncio.run(slow_head()), asyncio.run(silent())):
        assert answer.status == 408 and "did not arrive within 1 s" in orjson.loads(answer.body)["error"]
        assert seconds < 3, seconds


def test_a_stalled_body_gets_408_within_its_grace_and_stores_nothing(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """A body announced at 1,000 bytes stops after 10: 408 once body_grace_s (1 s) plus the time its 10
    bytes buy at the minimum rate have passed; the total cap (body_timeout_s) bounds a fast-enough trickle."""
    settings = make_settings(
        receiver={"port": 0, "body_grace_s": 1.0, "body_min_bytes_per_s": 100, "body_timeout_s": 3.0}
    )
    port = port_of(start_receiver(settings))

    async def stalled() -> tuple[Answer, float]:
        reader, writer = await open_upload(port, PATH, "wk_acme_1", 1000)
        started = time.monotonic()
        writer.write(b"x" * 10)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return parse_answer(raw), time.monotonic() - started

    async def fast_enough_trickle() -> Answer | None:
        reader, writer = await open_upload(port, PATH, "wk_acme_1", 1000)
        return await trickle(writer, reader, 0.005, 10)  # ~200 bytes/s: over the rate, not done in 3 s

    answer, seconds = asyncio.run(stalled())
    assert answer.status == 408 and "slower than 100 bytes/s" in orjson.loads(answer.body)["error"]
    assert 1.0 <= seconds < 2.5, seconds
    capped = asyncio.run(fast_enough_trickle())
    assert capped is not None and capped.status == 408, capped
    assert "did not arrive within 3 s" in orjson.loads(capped.body)["error"]
    assert read_records(settings, settings.topics.raw("customerglu")) == []


def test_announced_bytes_hold_nothing_until_they_arrive(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """max_bytes_in_flight = 10,000: two uploads announcing 5,000 bytes each and sending none do not hold
    the budget, so a third request gets 200; the two then complete with 200."""
    settings = make_settings(receiver={"port": 0, "max_body_bytes": 5_000, "max_bytes_in_flight": 10_000})
    port = port_of(start_receiver(settings))

    async def run() -> tuple[int, list[int]]:
        uploads = [await open_upload(port, PATH, "wk_acme_1", 5000) for _ in range(2)]
        third_reader, third_writer = await open_upload(port, PATH, "wk_acme_1", 3)
        third_writer.write(b"abc")
        third = parse_answer(await asyncio.wait_for(third_reader.read(), 10)).status
        statuses = []
        for n, (reader, writer) in enumerate(uploads):
            writer.write(bytes([ord("a") + n]) * 5000)
            statuses.append(parse_answer(await asyncio.wait_for(reader.read(), 10)).status)
            writer.close()
        return third, statuses

    assert asyncio.run(run()) == (200, [200, 200])
    records = wait_for(
        lambda: len(r := read_records(settings, settings.topics.raw("customerglu"))) == 3 and r
    )
    assert sorted(r.value[:1] for r in records) == [b"a", b"abc"[:1], b"b"]


def test_a_tenant_over_its_byte_share_gives_way_to_another(
    make_settings: Callable[..., Settings], start_receiver: Callable[[Settings], str]
) -> None:
    """Budget 10,000 bytes. acme sends 3 bodies of 3,000 bytes each (of 4,000 announced) and stalls: it
    holds 9,000. globex then sends 4,000 bytes: acme (over its 5,000 share) gives way, its largest body is
    refused with 429, and globex gets 200 at once."""
    settings = make_settings(
        receiver={
            "port": 0,
            "max_body_bytes": 5_000,
            "max_bytes_in_flight": 10_000,
            "body_grace_s": 30.0,
            "fair_window_s": 30.0,
        }
    )
    port = port_of(start_receiver(settings))

    async def run() -> tuple[list[int], Answer, float]:
        hogs = [await open_upload(port, PATH, "wk_acme_1", 4000) for _ in range(3)]
        for _, writer in hogs:
            writer.write(b"h" * 3000)
            await writer.drain()
        await asyncio.sleep(0.3)  # the receiver has read what acme sent
        started = time.monotonic()
        reader, writer = await open_upload(port, PATH, "wk_globex_1", 4000)
        writer.write(b"g" * 4000)
        answer = parse_answer(await asyncio.wait_for(reader.read(), 10))
        seconds = time.monotonic() - started
        writer.close()
        evicted = []
        for hog_reader, hog_writer in hogs:
            try:
                evicted.append(parse_answer(await asyncio.wait_for(hog_reader.read(), 0.5)).status)
            except TimeoutError:
                evicted.append(0)  # still waiting for the rest of its body
            hog_writer.close()
        return evicted, answer, seconds

    evicted, answer, seconds = asyncio.run(run())
    assert answer.status == 200 and seconds < 1, (answer, seconds)
    assert evicted.count(429) == 1 and evicted.count(0) == 2, evicted


def test_expect_100_continue_is_answered_only_after_authentication(
    settings: Settings, start_receiver: Callable[[Settings], str]
) -> None:
    """An unknown key gets 401 and never a `100 Continue`; a known one gets 100, sends its body, then 200."""
    port = port_of(start_receiver(settings))

    async def ask(key: str) -> bytes:
        reader, writer = await open_upload(port, PATH, key, 2, "Expect: 100-continue\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if first.startswith(b"HTTP/1.1 100"):
            writer.write(b"{}")
            first += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(parse_answer(first).headers["content-length"])
        first += await asyncio.wait_for(reader.readexactly(length), 10)
        writer.close()
        return first

    refused = asyncio.run(ask("wk_nobody"))
    assert refused.startswith(b"HTTP/1.1 401") and b"100 Continue" not in refused
    accepted = asyncio.run(ask("wk_acme_1"))
    assert accepted.startswith(b"HTTP/1.1 100 Continue\r\n\r\n") and parse_answer(accepted).status == 200
