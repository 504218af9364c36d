"""The thin receiver: authenticate, write the exact body to raw.<source>, answer 200 after the broker's ack.

No parsing beyond what auth needs ("validate late", docs/sources.md §1). Bad credentials -> 401, oversize ->
413, Kafka slow or down or the in-flight bound reached -> 503 + Retry-After: never a 200 for a payload
that is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiokafka import AIOKafkaProducer

from adapters import ADAPTERS
from pipeline.adapting import AdapterModule
from pipeline.config import Settings
from pipeline.errors import AuthError, BrokerUnavailable, PayloadTooLarge
from pipeline.ingest.admission import Admission, Lease
from pipeline.ingest.auth import ReplayGuard, TenantDirectory, verify_body
from pipeline.ingest.batching import BatchWriter
from pipeline.ingest.body import read_body
from pipeline.ingest.connections import DeadlineServer
from pipeline.ingest.headers import HeaderTemplates, KafkaHeaderList
from pipeline.ingest.inputs import request_meta, short_text
from pipeline.ingest.items import ItemLimits
from pipeline.ingest.metrics import ReceiverMetrics
from pipeline.ingest.refusals import BadRequest, OverShare, TooSlow
from pipeline.kafka.clients import broker_answers, ensure_topics, make_producer
from pipeline.kafka.outage import OUTAGE
from pipeline.kafka.security import verify_access
from pipeline.process import settle_garbage_collector

log = logging.getLogger(__name__)

OK_BODY = b'{"status":"ok"}'
IN_FLIGHT_REFRESH_S = 1.0
KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this (aiohttp's default: an hour)
KafkaHeaders = Sequence[tuple[str, bytes]]
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"status": "error", "error": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def refusal(exc: Exception) -> web.Response:
    """The answer to a refused request: 400/401/408/413/429/503, each with a JSON reason."""
    if isinstance(exc, AuthError):
        return _json_error(401, str(exc))
    if isinstance(exc, BadRequest):
        return _json_error(400, str(exc))
    if isinstance(exc, PayloadTooLarge):
        return _json_error(413, str(exc), {"Connection": "close"})
    if isinstance(exc, TooSlow):
        return _json_error(408, str(exc), {"Connection": "close"})
    retry = {"Retry-After": str(int(max(1, getattr(exc, "retry_after_s", 1))))}
    if isinstance(exc, OverShare):
        return _json_error(429, str(exc), retry)
    log.warning("503: %s", exc)
    return _json_error(503, "temporarily unable to store the request; retry later", retry)


def unsupported_expectation(request: web.BaseRequest) -> web.Response | None:
    """Only `Expect: 100-continue` is supported; any other expectation is a 400, not a 417."""
    expect = request.headers.get("Expect", "")
    if request.version != (1, 1) or not expect or expect.lower() == "100-continue":
        return None
    return _json_error(400, "the Expect header supports only 100-continue")


async def grant_continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` once the sender is authenticated and admitted: an unknown sender is
    refused before it uploads anything, and is never invited to send its body."""
    if request.version == (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


REFUSED = (AuthError, BadRequest, PayloadTooLarge, OverShare, TooSlow, BrokerUnavailable)


def abandons_body(exc: Exception) -> bool:
    """A refusal that leaves a body half read: the connection is closed right after the answer instead of
    reading and discarding the rest (aiohttp's lingering close), which a slow sender would stretch."""
    return isinstance(exc, TooSlow | PayloadTooLarge) or (isinstance(exc, OverShare) and exc.evicted)


async def answer_and_close(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Send the answer now, then close the connection (the transport flushes it before closing)."""
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


class Receiver:
    """The aiohttp application plus its producer; `start()` binds the port, `stop()` drains and closes."""

    def __init__(
        self,
        settings: Settings,
        adapters: Mapping[str, AdapterModule] | None = None,
        reuse_port: bool = False,
        multiprocess_metrics: bool = False,
    ) -> None:
        self.settings = settings
        self.adapters = dict(adapters or ADAPTERS)
        self.directory = TenantDirectory(settings)
        self.metrics = ReceiverMetrics(multiprocess_metrics)
        self.admission = Admission(settings.receiver, self.metrics.refused)
        self.metrics.track_in_flight(lambda: self.admission.count)
        self.header_templates = HeaderTemplates()
        self.reuse_port = reuse_port
        self.producer: AIOKafkaProducer | None = None
        self.writer: BatchWriter | None = None
        self.rewards_producer: AIOKafkaProducer | None = None
        self.rewards_writer: BatchWriter | None = None
        self.port: int | None = None
        self._runner: web.ServerRunner | None = None
        self._operator_runner: web.ServerRunner | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self.items = ItemLimits(settings.receiver)
        self.replays = ReplayGuard()
        self._source_of: dict[str, str] = {settings.topics.rewards: "rewards"}
        self._source_of.update({settings.topics.raw(s): s for s in self.adapters})

    # --- lifecycle --------------------------------------------------------------------------------------

    def routes(self) -> dict[str, dict[str, Handler]]:
        """path -> method -> handler: every adapter's ROUTES (one trailing slash is the same route,
        docs/sources.md), rewards in for systems without Kafka, liveness and readiness. Nothing here
        names a tenant: /metrics is on the operator port (`operator_routes`)."""
        table: dict[str, dict[str, Handler]] = {}
        for adapter in self.adapters.values():
            handler = self._handler(adapter)
            for path in adapter.ROUTES:
                table[path] = table[path + "/"] = {"POST": handler}
        table["/rewards/v1"] = {"POST": self._rewards}
        for path, get in (("/healthz", self._healthz), ("/readyz", self._readyz)):
            table[path] = {"GET": get, "HEAD": get}
        return table

    def operator_routes(self) -> dict[str, dict[str, Handler]]:
        """The operator port: /metrics (tenant ids with their volumes), /healthz with the pid, /readyz."""
        table: dict[str, dict[str, Handler]] = {}
        for path, get in (
            ("/healthz", self._operator_healthz),
            ("/readyz", self._operator_readyz),
            ("/metrics", self._metrics),
        ):
            table[path] = {"GET": get, "HEAD": get}
        return table

    def server(self, routes: dict[str, dict[str, Handler]] | None = None) -> web.Server:
        """aiohttp's low-level server around one dispatch on a dict of exact paths.

        The routes are a fixed set of exact paths, so aiohttp's Application (router, middlewares, match
        info, per-route expect handlers) is work we do not need on every request: measured on the bare
        handler of bench/bare_http.py, the low-level server costs 15-25 % less CPU a request.
        """
        routes = self.routes() if routes is None else routes
        limit = self.settings.receiver.max_body_bytes + 1

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            methods = routes.get(request.path)
            if methods is None:
                return _json_error(404, "no such endpoint")
            handler = methods.get(request.method)
            if handler is None:
                return _json_error(
                    405, f"{request.method} is not allowed here", {"Allow": ", ".join(methods)}
                )
            if "Expect" in request.headers:
                refused = unsupported_expectation(request)
                if refused is not None:
                    return refused
            return await handler(request)

        def make_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            return web.BaseRequest(
                message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=limit
            )

        return DeadlineServer(
            dispatch,
            request_factory=make_request,
            access_log=None,
            head_timeout_s=self.settings.receiver.head_timeout_s,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        )

    async def start(self) -> int:
        if self.settings.kafka.security_protocol != "PLAINTEXT":
            # A refused login or an untrusted certificate ends the process here (KafkaAccessRefused),
            # instead of a receiver that listens and answers 503 forever.
            await verify_access(self.settings.kafka)
        topics = [self.settings.topics.raw(s) for s in self.adapters] + [self.settings.topics.rewards]
        try:
            await ensure_topics(self.settings, topics)
        except BrokerUnavailable as exc:  # start anyway: answer 503 until Kafka is back
            log.warning("could not create topics at start-up (%s); sends will retry", exc)
        self._connecting = asyncio.create_task(self._start_producer())
        with contextlib.suppress(TimeoutError):  # bind anyway: 503 until Kafka answers
            await asyncio.wait_for(asyncio.shield(self._connecting), 15)
        self._runner = web.ServerRunner(self.server())
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.settings.receiver.host,
            self.settings.receiver.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        await site.start()
        if self.settings.receiver.operator_port:
            await self._start_operator_port()
        if self.metrics.multiprocess:
            self._refreshing = asyncio.create_task(self._refresh_in_flight())
        server = site._server
        sockets = server.sockets if isinstance(server, asyncio.Server) else []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.receiver.port
        log.info(
            "receiver listening on http://%s:%s (pid %s)", self.settings.receiver.host, self.port, os.getpid()
        )
        return self.port

    async def _start_operator_port(self) -> None:
        """/metrics apart from ingestion: with --processes N every process listens here too
        (SO_REUSEPORT), and each answers the sum over all of them."""
        cfg = self.settings.receiver
        self._operator_runner = web.ServerRunner(self.server(self.operator_routes()))
        await self._operator_runner.setup()
        site = web.TCPSite(
            self._operator_runner,
            cfg.operator_host,
            cfg.operator_port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )
        await site.start()
        log.info("receiver operator port (/metrics) on http://%s:%s", cfg.operator_host, cfg.operator_port)

    async def _start_producer(self) -> None:
        """Connect in the background: until Kafka answers, writes get 503 and /readyz says not ready.

        Two producers: the idempotent one of every write (retries never duplicate a record), and one for
        reward arrays whose batches expire at 80% of ack_timeout_s instead of being retried forever
        (an idempotent aiokafka producer never expires a batch). A reward array refused with a 503 is
        therefore not written later, unless the broker already had it when its answer was lost; then it
        is there whole, and delivery deduplicates the sender's retry on rewardId.
        """
        cfg = self.settings.receiver
        expiring = int(cfg.ack_timeout_s * 800)
        while True:
            producer = make_producer(self.settings)
            rewards_producer = make_producer(
                self.settings, enable_idempotence=False, request_timeout_ms=expiring
            )
            try:
                await producer.start()
                await rewards_producer.start()
            except asyncio.CancelledError:
                await producer.stop()
                await rewards_producer.stop()
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka down at boot: keep serving 503s and retry
                log.warning("Kafka not reachable at start-up (%s); retrying", exc)
                await producer.stop()
                await rewards_producer.stop()
                await asyncio.sleep(1.0)
            else:
                self.writer = self._writer(producer)
                self.rewards_writer = self._writer(rewards_producer)
                self.producer = producer
                self.rewards_producer = rewards_producer
                return

    def _writer(self, producer: AIOKafkaProducer) -> BatchWriter:
        cfg = self.settings.receiver
        return BatchWriter(
            producer,
            cfg.ack_timeout_s,
            cfg.retry_after_s,
            self.settings.max_record_bytes,
            lambda topic, seconds: self.metrics.observe_ack(self._source_of.get(topic, topic), seconds),
        )

    async def _refresh_in_flight(self) -> None:
        """With --processes N each process writes its in-flight count to the shared files once a second."""
        while True:
            self.metrics.refresh_in_flight()
            await asyncio.sleep(IN_FLIGHT_REFRESH_S)

    async def stop(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._operator_runner is not None:
            await self._operator_runner.cleanup()
        for writer in (self.writer, self.rewards_writer):
            if writer is not None:
                await writer.close()
        for producer in (self.producer, self.rewards_producer):
            if producer is not None:
                await producer.stop()
        self.items.close()

    # --- handlers ---------------------------------------------------------------------------------------

    def _handler(self, adapter: AdapterModule) -> Handler:
        source = adapter.SOURCE
        topic = self.settings.topics.raw(source)
        batched = adapter.BATCHED

        async def handle(request: web.BaseRequest) -> web.Response:
            tenant_id = "-"
            stored = 0
            try:
                credentials = self.directory.authenticate(adapter.AUTH, request)
                tenant_id = credentials.tenant.id
                meta = request_meta(request, adapter.REQUEST_META) if adapter.REQUEST_META else {}
                vendor = {**credentials.vendor, **meta} if meta else credentials.vendor
                request_id, headers = self._headers(source, tenant_id, request, vendor)
                lease = await self._admit(tenant_id, request)
                try:
                    body = await read_body(request, lease, self.admission)
                    if batched:
                        await self.items.check_batch(body)
                    verify_body(adapter.AUTH, credentials.tenant, request, body, self.replays)
                    assert self.writer is not None
                    await self.writer.write(topic, body, headers)  # shared by the batch: see _admit
                    stored = len(body)
                finally:
                    self.admission.leave(lease)
            except REFUSED as exc:
                response = refusal(exc)
                if abandons_body(exc):
                    await answer_and_close(request, response)
            else:
                response = web.Response(
                    body=OK_BODY, headers={"Content-Type": "application/json", "X-Request-Id": request_id}
                )
            self.metrics.request(source, tenant_id, response.status, stored)
            return response

        return handle

    async def _rewards(self, request: web.BaseRequest) -> web.Response:
        """POST /rewards/v1 (a rewards key): one reward or an array -> one record per reward, all or none.

        Like the other routes it stores what it is given; invalid rewards are dead-lettered by the
        dispatcher's intake, and listed in the 200 answer so the sender learns about them at once. The
        records of one request go to Kafka as one record batch on one partition, which the broker appends
        whole or not at all: a 200 means every reward is stored, a 503 that none is.
        """
        tenant_id = "-"
        try:
            credentials = self.directory.rewards_key(request)
            tenant_id = credentials.tenant.id
            request_id, kafka_headers = self._headers("rewards", tenant_id, request, {})
            lease = await self._admit(tenant_id, request)
            try:
                body = await read_body(request, lease, self.admission)
                records, invalid = await self.items.split_rewards(body)
                if records:
                    assert self.rewards_writer is not None
                    batch = [(r, kafka_headers) for r in records]
                    await self.rewards_writer.write_all(self.settings.topics.rewards, batch)
            finally:
                self.admission.leave(lease)
        except REFUSED as exc:
            response = refusal(exc)
            if abandons_body(exc):
                await answer_and_close(request, response)
        else:
            answer: dict[str, object] = {"status": "ok", "count": len(records)}
            if invalid:
                answer["invalid"] = invalid
            response = web.Response(
                body=orjson.dumps(answer),
                content_type="application/json",
                headers={"X-Request-Id": request_id},
            )
        self.metrics.request("rewards", tenant_id, response.status)
        return response

    async def _admit(self, tenant: str, request: web.BaseRequest) -> Lease:
        """Take an in-flight slot before the body is read (its bytes are counted as they arrive), then
        grant `Expect: 100-continue`.

        Handlers then await the ack future their record's batch shares with other requests, without
        asyncio.shield: aiohttp does not cancel handlers when a client goes away (handler_cancellation is
        off), and at shutdown every request of the batch is cancelled anyway.
        """
        if self.writer is None:
            raise BrokerUnavailable("not connected to Kafka yet", self.settings.receiver.retry_after_s)
        limit = self.settings.receiver.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
        entered = self.admission.enter(tenant)
        lease = entered if isinstance(entered, Lease) else await entered
        try:
            await grant_continue(request)
        except BaseException:
            self.admission.leave(lease)
            raise
        return lease

    def _headers(
        self, source: str, tenant: str, request: web.BaseRequest, vendor: Mapping[str, str]
    ) -> tuple[str, KafkaHeaderList]:
        content_type = short_text(request.headers.get("Content-Type"), "header Content-Type")
        return self.header_templates.build(tenant, source, content_type, vendor)

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        """Liveness on the public port: the event loop answers. Nothing about the process."""
        return web.json_response({"status": "ok"})

    async def _operator_healthz(self, request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid(), "kafka": OUTAGE.state()})

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        """Readiness on the public port: Kafka answers. The details are on the operator port."""
        if await self._kafka_answers():
            return web.json_response({"status": "ready"})
        return _json_error(
            503, "Kafka is not reachable", {"Retry-After": str(self.settings.receiver.retry_after_s)}
        )

    async def _operator_readyz(self, request: web.BaseRequest) -> web.Response:
        """Readiness with the outage's details (broker, since when, the error): pipeline.kafka.outage."""
        ready = await self._kafka_answers()
        body = {"status": "ready" if ready else "not ready", "kafka": OUTAGE.state()}
        if ready:
            return web.json_response(body)
        retry = {"Retry-After": str(self.settings.receiver.retry_after_s)}
        return web.json_response({**body, "error": "Kafka is not reachable"}, status=503, headers=retry)

    async def _kafka_answers(self) -> bool:
        if self.producer is None:
            return False
        return await broker_answers(self.producer)

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


async def serve(
    settings: Settings, stop: asyncio.Event, reuse_port: bool = False, multiprocess_metrics: bool = False
) -> None:
    """Run a receiver until `stop` is set."""
    receiver = Receiver(settings, reuse_port=reuse_port, multiprocess_metrics=multiprocess_metrics)
    await receiver.start()
    settle_garbage_collector()
    try:
        await stop.wait()
    finally:
        await receiver.stop()
