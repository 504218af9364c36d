"""Reward webhook URLs: https:// and public addresses only, unless the tenant sets allow_private_url; the
config refuses what it can see, and the sender refuses a name that resolves to a private address (real
HTTP on loopback: the server must see nothing)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from pydantic import ValidationError

from pipeline.config import RewardsWebhook
from pipeline.rewards.sender import Sender
from pipeline.webhook_urls import is_public_address


@pytest.mark.parametrize(
    "url",
    [
        "http://rewards.example.com/hook",  # plain http
        "https://127.0.0.1/hook",  # loopback
        "https://localhost:8443/hook",
        "https://10.1.2.3/hook",  # private
        "https://192.168.0.10/hook",
        "https://172.16.5.4/hook",
        "https://169.254.169.254/latest/meta-data",  # link-local: cloud metadata
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",  # IPv4 mapped into IPv6
        "https://0.0.0.0/hook",
        "ftp://rewards.example.com/hook",
    ],
)
def test_the_config_refuses_a_webhook_url_that_is_not_https_or_not_public(url: str) -> None:
    with pytest.raises(ValidationError, match="rewards_webhook url"):
        RewardsWebhook(url=url)


def test_allow_private_url_permits_http_and_private_addresses_and_public_https_needs_nothing() -> None:
    assert RewardsWebhook(url="http://127.0.0.1:9000/hook", allow_private_url=True).allow_private_url
    assert RewardsWebhook(url="https://10.0.0.7/hook", allow_private_url=True)
    assert RewardsWebhook(url="https://rewards.example.com/hook")
    assert RewardsWebhook(url="https://93.184.216.34/hook")
    with pytest.raises(ValidationError, match="https"):
        RewardsWebhook(url="file:///etc/passwd", allow_private_url=True)


def test_is_public_address() -> None:
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1:248:1893:25c8:1946")
    for address in ("127.0.0.1", "10.0.0.1", "169.254.1.1", "::1", "fc00::1", "224.0.0.1", "100.64.0.1", "x"):
        assert not is_public_address(address), address


def test_a_name_that_resolves_to_a_private_address_is_not_called() -> None:
    """The host's own name resolves to loopback/private here: without allow_private_url the attempt fails
    as a connection error naming the address and the server sees no request; with it, the request lands."""
    hostname = socket.gethostname()
    addresses = {str(info[4][0]) for info in socket.getaddrinfo(hostname, 80, type=socket.SOCK_STREAM)}
    if any(is_public_address(a) for a in addresses):
        pytest.skip(f"{hostname} resolves to a public address here")

    async def run() -> None:
        seen: list[bytes] = []

        async def hook(request: web.Request) -> web.Response:
            seen.append(await request.read())
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        sender = Sender()
        try:
            public_only = RewardsWebhook(url=f"https://{hostname}:{port}/hook", timeout_s=5)
            refused = await sender.post("a", public_only, "r1", b"{}", 1)
            assert refused.status is None and "no public address" in (refused.error or "")
            assert seen == []
            allowed = RewardsWebhook(
                url=f"http://{hostname}:{port}/hook", allow_private_url=True, timeout_s=5
            )
            accepted = await sender.post("b", allowed, "r1", b"{}", 1)
            assert accepted.status == 200 and seen == [b"{}"]
        finally:
            await sender.close()
            await runner.cleanup()

    asyncio.run(run())
