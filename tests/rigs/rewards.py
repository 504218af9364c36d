"""Test rig for the reward dispatcher: a customer webhook server on loopback, a dispatcher subprocess,
hand-written TOML, and helpers to produce rewards and read the topics back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.kafka.local import free_port
from pipeline.rewards.records import AttemptOutcome, RewardDeadLetter, parse_message
from rigs.kafka import HeadwaterProcess, LoopThread, read_records, topics_for


@dataclass
class Seen:
    """One request the customer's server received."""

    tenant: str
    headers: CIMultiDict[str]
    body: bytes
    at: float

    @property
    def reward_id(self) -> str:
        return self.headers.get("X-Reward-Id", "")


@dataclass
class Customer:
    """The tenants' webhook endpoints: POST /hooks/<tenant>, behaviour chosen per tenant, all requests kept.

    Behaviours: ok (200), flaky (503 for the first two requests of each X-Reward-Id, then 200), bad (400),
    hang (never answers in time), ratelimited (429 + Retry-After: 1 once per reward, then 200), gone (410).
    `on_request` runs before the answer (the crash test kills the dispatcher there).
    """

    behaviour: dict[str, str] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    on_request: Callable[[Seen], None] | None = None
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/hooks/{tenant}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, tenant: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{tenant}"

    def seen(self, tenant: str, reward_id: str | None = None) -> list[Seen]:
        return [s for s in list(self.requests) if s.tenant == tenant and reward_id in (None, s.reward_id)]

    async def _handle(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        seen = Seen(tenant, CIMultiDict(request.headers), await request.read(), time.time())
        earlier = len(self.seen(tenant, seen.reward_id))
        self.requests.append(seen)
        if self.on_request is not None:
            self.on_request(seen)
        mode = self.behaviour.get(tenant, "ok")
        if mode == "flaky" and earlier < 2:
            return web.Response(status=503, text="try later")
        if mode == "bad":
            return web.Response(status=400, text='{"error":"unknown user"}')
        if mode == "gone":
            return web.Response(status=410, text="this endpoint is gone")
        if mode == "hang":
            await asyncio.sleep(30)
        if mode == "ratelimited" and earlier == 0:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text='{"ok":true}', content_type="application/json")


def render_toml(doc: dict[str, Any]) -> str:
    """A settings document as TOML: [section] tables, [[tenants]] with inline tables (by hand, no
    SecretStr)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for section, body in doc.items():
        if section == "tenants":
            for tenant in body:
                lines.append("[[tenants]]")
                lines += [f"{k} = {value(v)}" for k, v in tenant.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def settings_doc(
    bootstrap: str, prefix: str, data_dir: Path, web_port: int, tenants: list[dict[str, Any]], **rewards: Any
) -> dict[str, Any]:
    """Unique topics and group per test run, short retry delays, a fast tick."""
    return {
        "kafka": {"bootstrap_servers": bootstrap, "partitions": 3},
        "local_kafka": {"enabled": False},
        "topics": topics_for(prefix),
        "receiver": {"port": 0, "ack_timeout_s": 5.0},
        "worker": {"app_id": prefix, "data_dir": str(data_dir), "web_port": 0},
        "rewards": {
            "retry_delays": ["0.2s", "0.5s"],
            "jitter": 0.0,
            "tick": "0.05s",
            "breaker_failures": 5,
            "breaker_open": "1s",
            "session_timeout": "6s",
            "web_port": web_port,
            **rewards,
        },
        "tenants": tenants,
    }


class Dispatcher(HeadwaterProcess):
    """`headwater rewards run` in a subprocess; it exits by itself (--exit-after) and with the test
    process."""

    def __init__(self, config: Path, log: Path, exit_after_s: float = 240) -> None:
        args = ["--config", str(config), "rewards", "run", "--exit-after", str(exit_after_s)]
        super().__init__(args, log, stop_timeout_s=20)


def start_customer(loop: LoopThread, behaviour: dict[str, str]) -> Customer:
    customer = Customer(behaviour=dict(behaviour))
    loop.run(customer.start())
    return customer


@dataclass
class AcmeRig:
    """One tenant (acme) whose webhook is a customer server, and a dispatcher subprocess on its config."""

    settings: Settings
    config: Path
    customer: Customer
    dispatcher: Dispatcher


@contextmanager
def acme_dispatcher(
    bootstrap: str, tmp_path: Path, prefix: str, prepare: Callable[[Settings], None] | None = None
) -> Iterator[AcmeRig]:
    """Topics named `<prefix>_<random>`; `prepare` runs before the dispatcher starts (e.g. to create a
    topic with special settings). Everything is stopped on exit."""
    loop = LoopThread()
    customer = start_customer(loop, {})
    tenants = [{"id": "acme", "rewards_webhook": {"url": customer.url("acme"), "allow_private_url": True}}]
    doc = settings_doc(
        bootstrap, f"{prefix}_{uuid.uuid4().hex[:8]}", tmp_path / "worker", free_port(), tenants
    )
    settings = Settings.model_validate(doc)
    config = tmp_path / "headwater.toml"
    config.write_text(render_toml(doc))
    try:
        if prepare is not None:
            prepare(settings)
        dispatcher = Dispatcher(config, tmp_path / "dispatcher.log", exit_after_s=180)
        try:
            yield AcmeRig(settings, config, customer, dispatcher)
        finally:
            dispatcher.stop()
    finally:
        loop.run(customer.stop())
        loop.close()


def produce(settings: Settings, records: list[tuple[str | None, bytes]]) -> list[float]:
    """Write (tenant, body) records to the rewards topic as an upstream system would; returns ack times."""
    return produce_with_headers(
        settings,
        [([("hw-tenant", tenant.encode())] if tenant is not None else [], body) for tenant, body in records],
    )


def produce_with_headers(
    settings: Settings, records: list[tuple[list[tuple[str, bytes]], bytes | None]]
) -> list[float]:
    """Write (headers, value) records to the rewards topic, headers as given (hostile ones too)."""

    async def run() -> list[float]:
        await ensure_topics(settings, [settings.topics.rewards])
        producer = make_producer(settings, linger_ms=0)
        await producer.start()
        try:
            acked = []
            for headers, body in records:
                await producer.send_and_wait(settings.topics.rewards, body, headers=headers)
                acked.append(time.time())
            return acked
        finally:
            await producer.stop()

    return asyncio.run(run())


def dead_letters(settings: Settings) -> list[RewardDeadLetter]:
    return [RewardDeadLetter.from_json(r.value) for r in read_records(settings, settings.topics.rewards_dlq)]


def outcomes(settings: Settings, reward_id: str) -> list[AttemptOutcome]:
    """The attempt log: every AttemptOutcome for a reward on rewards.deliveries, in attempt order."""
    found = []
    for record in read_records(settings, settings.topics.rewards_deliveries):
        message = parse_message(record.value)
        if isinstance(message, AttemptOutcome) and message.reward_id == reward_id:
            found.append(message)
    return sorted(found, key=lambda o: o.attempt.number)
