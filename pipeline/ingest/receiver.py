"""The thin receiver: authenticate, write the exact body to raw.<source>, answer 200 after the broker's ack.

No parsing beyond what auth needs ("validate late", sources.md §1). Bad credentials -> 401, oversize ->
413, Kafka slow or down or the in-flight bound reached -> 503 + Retry-After: never a 200 for a payload
that is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import generate_latest

from adapters import ADAPTERS
from pipeline.adapting import AdapterModule, Header, RequestValue
from pipeline.config import Settings
from pipeline.errors import AuthError, BrokerUnavailable, PayloadTooLarge
from pipeline.ingest.auth import Credentials, TenantDirectory, verify_body
from pipeline.ingest.metrics import ReceiverMetrics
from pipeline.kafka.clients import broker_errors, ensure_topics, make_producer
from pipeline.records import RawHeaders, new_request_id, utc_now
from pipeline.rewards.records import split_rewards

log = logging.getLogger(__name__)

OK_BODY = b'{"status":"ok"}'


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"status": "error", "error": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class Receiver:
    """The aiohttp application plus its producer; `start()` binds the port, `stop()` drains and closes."""

    def __init__(self, settings: Settings, adapters: Mapping[str, AdapterModule] | None = None) -> None:
        self.settings = settings
        self.adapters = dict(adapters or ADAPTERS)
        self.directory = TenantDirectory(settings)
        self.metrics = ReceiverMetrics()
        self.producer: AIOKafkaProducer | None = None
        self.in_flight = 0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.extra_routes: list[Callable[[web.Application], None]] = []

    # --- lifecycle --------------------------------------------------------------------------------------

    def application(self) -> web.Application:
        limit = self.settings.receiver.max_body_bytes
        app = web.Application(client_max_size=limit + 1)
        for adapter in self.adapters.values():
            handler = self._handler(adapter)
            for path in adapter.ROUTES:
                app.router.add_post(path, handler)
                app.router.add_post(path + "/", handler)  # one trailing slash is the same route (sources.md)
        app.router.add_post("/rewards/v1", self._rewards)  # issue 5: rewards in, for systems without Kafka
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        for add in self.extra_routes:
            add(app)
        return app

    async def start(self) -> int:
        topics = [self.settings.topics.raw(s) for s in self.adapters] + [self.settings.topics.rewards]
        try:
            await ensure_topics(self.settings, topics)
        except BrokerUnavailable as exc:  # start anyway: answer 503 until Kafka is back
            log.warning("could not create topics at start-up (%s); sends will retry", exc)
        self._connecting = asyncio.create_task(self._start_producer())
        with contextlib.suppress(TimeoutError):  # bind anyway: 503 until Kafka answers
            await asyncio.wait_for(asyncio.shield(self._connecting), 15)
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.settings.receiver.host,
            self.settings.receiver.port,
            reuse_address=True,
            backlog=1024,
        )
        await site.start()
        server = site._server
        sockets = server.sockets if isinstance(server, asyncio.Server) else []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.receiver.port
        log.info("receiver listening on http://%s:%s", self.settings.receiver.host, self.port)
        return self.port

    async def _start_producer(self) -> None:
        """Connect in the background: until Kafka answers, writes get 503 and /readyz says not ready."""
        while True:
            producer = make_producer(self.settings)
            try:
                await producer.start()
            except asyncio.CancelledError:
                await producer.stop()
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka down at boot: keep serving 503s and retry
                log.warning("Kafka not reachable at start-up (%s); retrying", exc)
                await producer.stop()
                await asyncio.sleep(1.0)
            else:
                self.producer = producer
                return

    async def stop(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.producer is not None:
            await self.producer.stop()

    # --- handlers ---------------------------------------------------------------------------------------

    def _handler(self, adapter: AdapterModule) -> Callable[[web.Request], Awaitable[web.Response]]:
        source = adapter.SOURCE

        async def handle(request: web.Request) -> web.Response:
            tenant_id = "-"
            try:
                credentials = self.directory.authenticate(adapter.AUTH, request)
                tenant_id = credentials.tenant.id
                body = await self._read_body(request)
                verify_body(adapter.AUTH, credentials.tenant, request, body)
                headers = self._raw_headers(source, credentials, request, adapter.REQUEST_META)
                await self.write(self.settings.topics.raw(source), body, headers, source)
            except AuthError as exc:
                response = _json_error(401, str(exc))
            except PayloadTooLarge as exc:
                response = _json_error(413, str(exc))
            except BrokerUnavailable as exc:
                retry = str(int(max(1, exc.retry_after_s)))
                log.warning("503 for %s: %s", source, exc)
                response = _json_error(
                    503, "temporarily unable to store the event; retry later", {"Retry-After": retry}
                )
            else:
                self.metrics.bytes.labels(source, tenant_id).inc(len(body))
                response = web.Response(
                    body=OK_BODY,
                    content_type="application/json",
                    headers={"X-Request-Id": headers.request_id},
                )
            self.metrics.requests.labels(source, tenant_id, str(response.status)).inc()
            return response

        return handle

    async def _rewards(self, request: web.Request) -> web.Response:
        """POST /rewards/v1: one reward or an array -> one record per reward on topics.rewards (issue 5).

        Like the other routes it stores what it is given; invalid rewards are dead-lettered by the
        dispatcher's intake, and listed in the 200 answer so the sender learns about them at once.
        """
        tenant_id = "-"
        try:
            credentials = self.directory.write_key(request)
            tenant_id = credentials.tenant.id
            records, invalid = split_rewards(await self._read_body(request))
            headers = self._raw_headers("rewards", credentials, request, {})
            await asyncio.gather(
                *(self.write(self.settings.topics.rewards, record, headers, "rewards") for record in records)
            )
        except AuthError as exc:
            response = _json_error(401, str(exc))
        except PayloadTooLarge as exc:
            response = _json_error(413, str(exc))
        except BrokerUnavailable as exc:  # some may be stored: a retry is safe, delivery dedups on rewardId
            response = _json_error(
                503,
                "temporarily unable to store the rewards; retry later",
                {"Retry-After": str(int(max(1, exc.retry_after_s)))},
            )
        else:
            answer: dict[str, object] = {"status": "ok", "count": len(records)}
            if invalid:
                answer["invalid"] = invalid
            response = web.Response(
                body=orjson.dumps(answer),
                content_type="application/json",
                headers={"X-Request-Id": headers.request_id},
            )
        self.metrics.requests.labels("rewards", tenant_id, str(response.status)).inc()
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.receiver.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(
                f"body of {request.content_length} bytes is over the limit of {limit} bytes"
            )
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes") from None

    def _raw_headers(
        self, source: str, credentials: Credentials, request: web.Request, wanted: Mapping[str, RequestValue]
    ) -> RawHeaders:
        vendor = dict(credentials.vendor)
        for name, where in wanted.items():
            value = (
                request.headers.get(where.name)
                if isinstance(where, Header)
                else request.query.get(where.name)
            )
            if value is not None:
                vendor[name] = value
        return RawHeaders(
            tenant=credentials.tenant.id,
            source=source,
            received_at=utc_now(),
            request_id=new_request_id(),
            content_type=request.headers.get("Content-Type"),
            vendor=vendor,
        )

    async def write(self, topic: str, body: bytes, headers: RawHeaders, source: str) -> None:
        """Send one record and wait for the ack, bounded in count (in-flight limit) and time (ack timeout)."""
        cfg = self.settings.receiver
        if self.producer is None:
            raise BrokerUnavailable("not connected to Kafka yet", cfg.retry_after_s)
        if self.in_flight >= cfg.max_in_flight:
            raise BrokerUnavailable("too many writes in flight", cfg.retry_after_s)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        started = time.perf_counter()
        try:
            async with broker_errors(f"writing to {topic}", cfg.retry_after_s):
                await asyncio.wait_for(self._send(topic, body, headers), cfg.ack_timeout_s)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
        self.metrics.produce_latency.labels(source).observe(time.perf_counter() - started)

    async def _send(self, topic: str, body: bytes, headers: RawHeaders) -> None:
        assert self.producer is not None
        ack = await self.producer.send(topic, body, headers=headers.to_kafka())
        await ack

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = False
        if self.producer is not None:
            try:
                ready = bool(await asyncio.wait_for(self.producer.client.force_metadata_update(), 3.0))
            except Exception:  # noqa: BLE001 - any failure means "not ready"
                ready = False
        if ready:
            return web.json_response({"status": "ready"})
        return _json_error(
            503, "Kafka is not reachable", {"Retry-After": str(self.settings.receiver.retry_after_s)}
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run a receiver until `stop` is set."""
    receiver = Receiver(settings)
    await receiver.start()
    try:
        await stop.wait()
    finally:
        await receiver.stop()
