"""The webhook sender: one signed POST per attempt, to public addresses only (pipeline.webhook_urls)."""

from __future__ import annotations

import errno
import hashlib
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from pipeline import __version__
from pipeline.config import RewardsWebhook
from pipeline.records import utc_now
from pipeline.rewards.records import Attempt, parse_retry_after
from pipeline.signing import SIGNATURE_HEADER, cg_signature, standard_headers
from pipeline.webhook_urls import is_public_address

USER_AGENT = f"headwater-rewards/{__version__}"
ERROR_SNIPPET_BYTES = 200


def webhook_id(tenant: str, reward_id: str) -> str:
    """The Standard Webhooks message id: the same on every attempt of a reward, and free of '.', which a
    rewardId may contain but a webhook-id must not (a hash of tenant and rewardId)."""
    digest = hashlib.sha256(f"{tenant}\x00{reward_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def request_headers(
    tenant: str, hook: RewardsWebhook, reward_id: str, body: bytes, attempt: int
) -> dict[str, str]:
    """Headers of one attempt. X-Reward-Id and webhook-id stay the same on every attempt (idempotency)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Reward-Id": reward_id,
        "X-Reward-Attempt": str(attempt),
    }
    if hook.token is not None:
        headers[SIGNATURE_HEADER] = cg_signature(body, hook.token.get_secret_value())
    if hook.standard_webhooks_secrets:
        secrets = [s.get_secret_value() for s in hook.standard_webhooks_secrets]
        headers.update(standard_headers(webhook_id(tenant, reward_id), body, secrets))
    return headers


class PublicResolver(AbstractResolver):
    """Resolves as aiohttp does, then keeps only public addresses: a name that resolves to loopback,
    link-local or private ranges only (now, or after a DNS change) fails the attempt as a connection
    error, so it is retried on its schedule and then dead-lettered."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        public = [r for r in found if is_public_address(r["host"])]
        if not public:
            shown = ", ".join(sorted({r["host"] for r in found}))
            refusal = f"{host} resolves to no public address ({shown}); allow_private_url is not set"
            raise OSError(errno.EACCES, refusal)  # aiohttp shows the strerror of what it wraps
        return public

    async def close(self) -> None:
        await self._resolver.close()


class Sender:
    """POSTs reward bodies; one connection pool per tenant, so a slow tenant cannot hold another's sockets."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, tenant: str, hook: RewardsWebhook) -> aiohttp.ClientSession:
        session = self._sessions.get(tenant)
        if session is None or session.closed:
            options: dict[str, Any] = {"limit": hook.max_concurrency, "ttl_dns_cache": 300}
            if not hook.allow_private_url:
                options["resolver"] = PublicResolver()
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**options), auto_decompress=False)
            self._sessions[tenant] = session
        return session

    async def post(
        self, tenant: str, hook: RewardsWebhook, reward_id: str, body: bytes, number: int
    ) -> Attempt:
        """One attempt; never raises for network trouble: the Attempt carries the status or the error."""
        at = utc_now()
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            host = urlsplit(hook.url).hostname or ""
            if not hook.allow_private_url and _is_ip(host) and not is_public_address(host):
                raise OSError(errno.EACCES, f"{host} is not a public address; allow_private_url is not set")
            async with self._session(tenant, hook).post(
                hook.url,
                data=body,
                headers=request_headers(tenant, hook, reward_id, body, number),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=hook.timeout_s),
            ) as response:
                status = response.status
                snippet = await response.content.read(ERROR_SNIPPET_BYTES)
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {snippet.decode('utf-8', 'replace')}".strip()
                    retry_after = parse_retry_after(response.headers.get("Retry-After"), at)
        except TimeoutError:
            error = f"timeout: no answer within {hook.timeout_s} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return Attempt(
            number=number, at=at, status=status, latency_ms=latency_ms, error=error, retry_after_s=retry_after
        )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
