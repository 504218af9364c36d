"""The thin receiver: authenticate, write the exact body to raw.<source>, answer 200 after the broker's ack.

No parsing beyond what auth needs ("validate late", sources.md §1). Bad credentials -> 401, oversize ->
413, Kafka slow or down or the in-flight bound reached -> 503 + Retry-After: never a 200 for a payload
that is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.config import SOURCES, Settings, Tenant
from pipeline.errors import AuthError, BrokerUnavailable, PayloadTooLarge
from pipeline.kafka import broker_errors, ensure_topics, make_producer
from pipeline.records import RawHeaders, utc_now
from pipeline.rewards import split_rewards

log = logging.getLogger(__name__)

# source id -> path (architecture.md "Sources"); a single trailing slash is the same route.
PATHS = {
    "customerglu": "/server/v4",
    "segment": "/segment/v4",
    "moengage": "/v3/moengage",
    "amplitude": "/amplitude/v4",
    "clevertap": "/clevertap/v4",
    "webengage": "/webengage/v4",
    "usermaven": "/api/v1/s2s/event",
}
WRITE_KEY_SOURCES = frozenset({"customerglu", "segment", "moengage", "amplitude", "clevertap", "rewards"})
OK_BODY = b'{"status":"ok"}'

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_request_id() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32; unique and sortable by time."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclass(frozen=True)
class Credentials:
    """Which tenant sent a request, plus the non-secret parts adapters need."""

    tenant: Tenant
    usermaven_api_key: str | None = None


class TenantDirectory:
    """Credential -> tenant lookups, built once from Settings (sources.md §1.1). Never derives from key text."""

    def __init__(self, settings: Settings) -> None:
        self.by_write_key: dict[bytes, Tenant] = {}
        self.by_usermaven_token: dict[bytes, Tenant] = {}
        self.by_license_code: dict[str, Tenant] = {}
        for tenant in settings.tenants:
            for key in tenant.write_keys:
                self.by_write_key[key.get_secret_value().encode()] = tenant
            for token in tenant.usermaven_tokens:
                self.by_usermaven_token[token.get_secret_value().encode()] = tenant
            if tenant.webengage:
                self.by_license_code[tenant.webengage.license_code] = tenant

    def authenticate(self, source: str, request: web.Request) -> Credentials:
        if source in WRITE_KEY_SOURCES:
            key = request.headers.get("X-API-KEY")
            tenant = self.by_write_key.get(key.encode()) if key else None
            if tenant is None:
                raise AuthError("missing or unknown X-API-KEY")
            return Credentials(tenant)
        if source == "webengage":
            license_code = request.query.get("licenseCode", "")
            secret = request.query.get("secret", "")
            tenant = self.by_license_code.get(license_code)
            if tenant is None or tenant.webengage is None or not tenant.webengage.accepts(secret):
                raise AuthError("unknown licenseCode or wrong secret")
            return Credentials(tenant)
        if source == "usermaven":
            token = request.query.get("token") or request.headers.get("X-Auth-Token") or ""
            tenant = self.by_usermaven_token.get(token.encode())
            if tenant is None or "." not in token:
                raise AuthError("missing or unknown token (expected API_KEY.SERVER_TOKEN)")
            return Credentials(tenant, usermaven_api_key=token.split(".", 1)[0])
        raise AuthError(f"unknown source {source}")


class ReceiverMetrics:
    """Prometheus metrics of one receiver instance (its own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "headwater_receiver_requests", "HTTP requests by source, tenant and status",
            ["source", "tenant", "status"], registry=self.registry,
        )
        self.bytes = Counter(
            "headwater_receiver_body_bytes", "Body bytes written to Kafka", ["source", "tenant"],
            registry=self.registry,
        )
        self.produce_latency = Histogram(
            "headwater_receiver_produce_seconds", "Time from send() to the broker's ack", ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge("headwater_receiver_in_flight", "Sends awaiting the broker's ack",
                               registry=self.registry)


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"status": "error", "error": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class Receiver:
    """The aiohttp application plus its producer; `start()` binds the port, `stop()` drains and closes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        for source, path in PATHS.items():
            handler = self._handler(source)
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
        topics = [self.settings.topics.raw(s) for s in SOURCES] + [self.settings.topics.rewards]
        try:
            await ensure_topics(self.settings, topics)
        except BrokerUnavailable as exc:  # start anyway: answer 503 until Kafka is back
            log.warning("could not create topics at start-up (%s); sends will retry", exc)
        self._connecting = asyncio.create_task(self._start_producer())
        with contextlib.suppress(TimeoutError):  # bind anyway: 503 until Kafka answers
            await asyncio.wait_for(asyncio.shield(self._connecting), 15)
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.receiver.host, self.settings.receiver.port,
                           reuse_address=True, backlog=1024)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
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

    def _handler(self, source: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            tenant_id = "-"
            try:
                credentials = self.directory.authenticate(source, request)
                tenant_id = credentials.tenant.id
                body = await self._read_body(request)
                if source == "segment":
                    _verify_segment_signature(credentials.tenant, request, body)
                headers = self._raw_headers(source, credentials, request)
                await self.write(self.settings.topics.raw(source), body, headers, source)
            except AuthError as exc:
                response = _json_error(401, str(exc))
            except PayloadTooLarge as exc:
                response = _json_error(413, str(exc))
            except BrokerUnavailable as exc:
                retry = str(int(max(1, exc.retry_after_s)))
                log.warning("503 for %s: %s", source, exc)
                response = _json_error(503, "temporarily unable to store the event; retry later",
                                       {"Retry-After": retry})
            else:
                self.metrics.bytes.labels(source, tenant_id).inc(len(body))
                response = web.Response(body=OK_BODY, content_type="application/json",
                                        headers={"X-Request-Id": headers.request_id})
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
            credentials = self.directory.authenticate("rewards", request)
            tenant_id = credentials.tenant.id
            records, invalid = split_rewards(await self._read_body(request))
            headers = self._raw_headers("rewards", credentials, request)
            await asyncio.gather(*(self.write(self.settings.topics.rewards, record, headers, "rewards")
                                   for record in records))
        except AuthError as exc:
            response = _json_error(401, str(exc))
        except PayloadTooLarge as exc:
            response = _json_error(413, str(exc))
        except BrokerUnavailable as exc:  # some may be stored: a retry is safe, delivery dedups on rewardId
            response = _json_error(503, "temporarily unable to store the rewards; retry later",
                                   {"Retry-After": str(int(max(1, exc.retry_after_s)))})
        else:
            answer: dict[str, object] = {"status": "ok", "count": len(records)}
            if invalid:
                answer["invalid"] = invalid
            response = web.Response(body=orjson.dumps(answer), content_type="application/json",
                                    headers={"X-Request-Id": headers.request_id})
        self.metrics.requests.labels("rewards", tenant_id, str(response.status)).inc()
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.receiver.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"body of {request.content_length} bytes is over the limit of {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes") from None

    def _raw_headers(self, source: str, credentials: Credentials, request: web.Request) -> RawHeaders:
        webengage = source == "webengage"
        return RawHeaders(
            tenant=credentials.tenant.id,
            source=source,
            received_at=utc_now(),
            request_id=new_request_id(),
            content_type=request.headers.get("Content-Type"),
            webengage_request_id=request.headers.get("x-request-id") if webengage else None,
            webengage_event_type=request.query.get("eventType") if webengage else None,
            webengage_license_code=request.query.get("licenseCode") if webengage else None,
            usermaven_api_key=credentials.usermaven_api_key,
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
        return _json_error(503, "Kafka is not reachable", {"Retry-After": str(self.settings.receiver.retry_after_s)})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _verify_segment_signature(tenant: Tenant, request: web.Request, body: bytes) -> None:
    """With a shared secret configured, X-Signature = hex HMAC-SHA1(secret, body) (sources.md §4.2).

    Segment's batched sends sign only the first element, so a JSON array body is not checked.
    """
    if tenant.segment_shared_secret is None or body.lstrip()[:1] == b"[":
        return
    expected = hmac.new(tenant.segment_shared_secret.get_secret_value().encode(), body, hashlib.sha1).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("X-Signature", "").lower()):
        raise AuthError("X-Signature does not match the body")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run a receiver until `stop` is set."""
    receiver = Receiver(settings)
    await receiver.start()
    try:
        await stop.wait()
    finally:
        await receiver.stop()
