"""The hostile suite: Hypothesis plays a sender with a valid key against the real receiver (real HTTP,
real broker) — random body sizes and shapes, item counts, header values, chunked, trickled, stalled and
half-sent bodies, slow heads — while another tenant keeps posting. Invariants:

- the attacker never gets a 5xx: every answer is 200 or a 4xx with a JSON reason (408 for slowness);
- the other tenant's requests all get 200, with a p99 under P99_LIMIT_S over the whole run;
- the receiver holds nothing afterwards (no in-flight slot, no body byte counted) and its memory stays
  bounded (resident size grows by less than MEMORY_LIMIT over the run).

The fast tier runs FAST_EXAMPLES examples; the slow variant many more.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rigs.hostile import parse_answer
from rigs.kafka import LoopThread, wait_for

from pipeline.config import Settings
from pipeline.ingest.receiver import Receiver

FAST_EXAMPLES = 25
SLOW_EXAMPLES = 250
P99_LIMIT_S = 0.5
MEMORY_LIMIT = 150 * 1_048_576
LIMITS = {
    "port": 0,
    "max_body_bytes": 262_144,
    "max_bytes_in_flight": 1_048_576,
    "head_timeout_s": 1.0,
    "body_grace_s": 0.3,
    "body_min_bytes_per_s": 4096,
    "body_timeout_s": 2.0,
    "max_items": 200,
    "max_rewards": 20,
}
ROUTES = {  # path -> headers that authenticate acme
    "/server/v4": "X-API-KEY: wk_acme_1\r\n",
    "/segment/v4": "X-API-KEY: wk_acme_1\r\n",
    "/v3/moengage": "X-API-KEY: wk_acme_1\r\n",
    "/clevertap/v4": "X-API-KEY: wk_acme_1\r\n",
    "/api/v1/s2s/event?token=ak_acme.st_acme": "",
    "/rewards/v1": "X-API-KEY: rk_acme_1\r\n",
}
ATTACKER_STATUSES = {200, 400, 401, 408, 413, 429}


@dataclass
class Attack:
    path: str
    body: bytes
    delivery: str  # whole | chunked | trickle | stall | overstate | slow_head
    pieces: int  # how many pieces a chunked or trickled body is cut into
    pause_s: float  # between pieces
    headers: str  # extra header lines
    expect_continue: bool


reward = st.fixed_dictionaries(
    {"campaignId": st.text(max_size=5), "userId": st.text(max_size=5), "rewardId": st.text(max_size=8)}
)
items: st.SearchStrategy[object] = st.one_of(
    st.just({}), st.just(0), st.just([]), reward, st.text(max_size=20)
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["array", "events", "profiles", "batch", "binary", "deep", "big", "commas"]))
    count = draw(st.integers(0, 400))
    element = draw(items)
    if shape == "array":
        return orjson.dumps([element] * count)
    if shape in ("events", "profiles", "batch"):
        return orjson.dumps({shape: [element] * count, "app_name": "x"})
    if shape == "binary":
        return draw(st.binary(max_size=2000))
    if shape == "deep":
        depth = draw(st.integers(1, 3000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    if shape == "commas":  # many commas, few items: the scan must walk them
        return b'[["' + b"," * draw(st.integers(0, 200_000)) + b'"]]'
    return b"[" + b"{}," * draw(st.integers(0, 120_000)) + b"{}]"  # up to and over max_body_bytes


header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
extra_headers = st.lists(
    st.tuples(
        st.sampled_from(["Content-Type", "X-Signature", "X-Request-Id", "Expect", "X-Junk"]), header_value
    ),
    max_size=3,
).map(lambda pairs: "".join(f"{name}: {value.strip()}\r\n" for name, value in pairs if value.strip()))

attacks = st.builds(
    Attack,
    path=st.sampled_from(sorted(ROUTES)),
    body=bodies(),
    delivery=st.sampled_from(["whole", "whole", "chunked", "trickle", "stall", "overstate", "slow_head"]),
    pieces=st.integers(1, 12),
    pause_s=st.floats(0.0, 0.4),
    headers=extra_headers,
    expect_continue=st.booleans(),
)


async def send(port: int, attack: Attack) -> bytes:
    """Deliver the attack over a raw connection; the receiver's answer (or b"" if it closed silently)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = attack.body
    chunked = attack.delivery == "chunked"
    length = len(body) + (1000 if attack.delivery == "overstate" else 0)
    head = (
        f"POST {attack.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"{ROUTES[attack.path]}{attack.headers}"
        + ("Expect: 100-continue\r\n" if attack.expect_continue and "Expect" not in attack.headers else "")
        + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n")
        + "\r\n"
    ).encode()
    answer = asyncio.ensure_future(reader.read())
    try:
        if attack.delivery == "slow_head":
            for piece in _cut(head, attack.pieces):
                writer.write(piece)
                if await _answered(answer, attack.pause_s * 4):
                    return answer.result()
            writer.write(body)
        else:
            writer.write(head)
            step = len(body) // 2 if attack.delivery == "stall" else None
            pieces = [body[:step]] if step is not None else _cut(body, attack.pieces)
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked and piece else piece)
                if attack.delivery in ("trickle", "chunked") and await _answered(answer, attack.pause_s):
                    return answer.result()
            if chunked:
                writer.write(b"0\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(answer, 15)
    except ConnectionError:  # closed while we were still sending: the answer may be lost with the reset
        try:
            return await asyncio.wait_for(answer, 15)
        except ConnectionError:
            return b""
    finally:
        answer.cancel()
        writer.close()


def _cut(data: bytes, pieces: int) -> list[bytes]:
    size = max(1, -(-len(data) // pieces))
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


async def _answered(answer: asyncio.Future[bytes], pause_s: float) -> bool:
    done, _ = await asyncio.wait({answer}, timeout=pause_s)
    return bool(done)


@dataclass
class Victim:
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def post_while(self, url: str, running: asyncio.Future[bytes]) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.perf_counter()
                async with session.post(url, data=b'{"victim":1}', headers={"X-API-KEY": "wk_globex_1"}) as r:
                    await r.read()
                    self.statuses.append(r.status)
                self.latencies.append(time.perf_counter() - started)
                if running.done():
                    return
                await asyncio.sleep(0.02)


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def hostile_receiver(make_settings: Callable[..., Settings], loop_thread: LoopThread) -> Iterator[Receiver]:
    receiver = Receiver(make_settings(receiver=LIMITS))
    loop_thread.run(receiver.start())
    yield receiver
    loop_thread.run(receiver.stop())


def run_suite(receiver: Receiver, examples: int) -> None:
    assert receiver.port is not None
    port = receiver.port
    victim = Victim()
    answers: list[int] = []
    resident_before = resident_bytes()

    @hypothesis_settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(attacks)
    def one(attack: Attack) -> None:
        async def run() -> bytes:
            attacking = asyncio.ensure_future(send(port, attack))
            await victim.post_while(f"http://127.0.0.1:{port}/server/v4", attacking)
            return await attacking

        raw = asyncio.run(run())
        if not raw:  # closed (or reset) while the attacker was still sending: nothing to check but the state
            answers.append(0)
            wait_for(lambda: receiver.admission.count == 0 and receiver.admission.bytes == 0, timeout=10)
            return
        answer = parse_answer(raw)
        answers.append(answer.status)
        assert answer.status in ATTACKER_STATUSES, (answer, attack.path, attack.delivery, attack.body[:80])
        if answer.status != 200:
            assert orjson.loads(answer.body)["status"] == "error", answer
        wait_for(
            lambda: receiver.admission.count == 0 and receiver.admission.bytes == 0,
            timeout=10,
            interval=0.05,
            explain=lambda: f"{receiver.admission.count} slots, {receiver.admission.bytes} B",
        )

    one()
    p99 = statistics.quantiles(victim.latencies, n=100, method="inclusive")[98]
    print(
        f"hostile suite: {examples} attacks, answers {sorted(set(answers))}; victim {len(victim.latencies)} "
        f"requests, p50 {statistics.median(victim.latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
        f"resident +{(resident_bytes() - resident_before) / 1_048_576:.0f} MiB"
    )
    assert set(victim.statuses) == {200}, victim.statuses
    assert p99 < P99_LIMIT_S, p99
    assert resident_bytes() - resident_before < MEMORY_LIMIT


def test_a_hostile_sender_gets_no_5xx_holds_nothing_and_never_slows_another_tenant(
    hostile_receiver: Receiver,
) -> None:
    run_suite(hostile_receiver, FAST_EXAMPLES)


@pytest.mark.slow
def test_a_hostile_sender_many_times_over(hostile_receiver: Receiver) -> None:
    run_suite(hostile_receiver, SLOW_EXAMPLES)
