"""Who may see the DLQ page, and the headers every answer carries.

Dead letters hold raw bodies: personal data. The page is served without credentials only on a loopback
address; anywhere else `dlq.page_token` is required. With a token set every page request must carry it,
as `Authorization: Bearer <token>` (scripts) or as HTTP basic auth with any user name and the token as
password (browsers ask for it after the 401's `WWW-Authenticate: Basic`).

Without a token the page also answers only requests whose `Host` names loopback or the configured
`dlq.page_host`: a web page the operator opens could otherwise point a name it controls at 127.0.0.1
(DNS rebinding) and read the letters through the operator's browser. Such a request gets 421.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

from pipeline.config import DlqSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REALM = "headwater dlq page"


def is_loopback(host: str) -> bool:
    """Is `host` a loopback listen address? '0.0.0.0', '::', '' and other names are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a Host header value, lower case, no port, no trailing dot: '[::1]:6068' -> '::1'."""
    value = host_header.strip().lower()
    if value.startswith("["):
        name = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        name = value.partition(":")[0]
    else:
        name = value
    return name.rstrip(".")


def names_this_page(host_header: str, configured: Collection[str]) -> bool:
    """May a request with this Host be answered without a token? Loopback names and the configured hosts."""
    name = host_name(host_header)
    return bool(name) and (is_loopback(name) or name in {host_name(host) for host in configured})


def refusal(host: str, settings: DlqSettings) -> str | None:
    """Why the page must not be served on `host` with these settings (None: it may)."""
    if settings.page_token is not None or is_loopback(host):
        return None
    return (
        f"refusing to serve dead letters on {host or 'every address'} without credentials: "
        "set dlq.page_token (or HEADWATER_DLQ_PAGE_TOKEN), or listen on a loopback address"
    )


def security_headers(style: str) -> dict[str, str]:
    """A strict CSP (only the page's own inline style, by hash), no framing, no caching, no sniffing."""
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{digest}'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def headers_middleware(style: str) -> Middleware:
    """Every answer, errors included, gets `security_headers`."""
    headers = security_headers(style)

    @web.middleware
    async def add_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405: answer it with our headers too
            exc.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    return add_headers


def guarded(settings: DlqSettings, handler: Handler, hosts: Collection[str] = ()) -> Handler:
    """`handler` behind the page's credentials. With a token: 401 unless the request carries it. Without:
    404 on a connection to a non-loopback address (the caller should not have routed the page there; this
    holds even if it did), 421 when the Host names neither loopback nor one of `hosts`, the addresses the
    page is configured on (`names_this_page`). /metrics is not guarded: Prometheus scrapes it."""
    token = settings.page_token.get_secret_value().encode() if settings.page_token is not None else None
    configured = (settings.page_host, *hosts)

    async def check(request: web.Request) -> web.StreamResponse:
        if token is None:
            local = request.transport.get_extra_info("sockname") if request.transport else None
            if not (isinstance(local, tuple) and is_loopback(str(local[0]))):
                raise web.HTTPNotFound()
            if not names_this_page(request.headers.get("Host", ""), configured):
                raise web.HTTPMisdirectedRequest(
                    text="the DLQ page answers only to a loopback host name or dlq.page_host without a token"
                )
        elif not _carries(request.headers.get("Authorization", ""), token):
            raise web.HTTPUnauthorized(
                text="the DLQ page needs its token (dlq.page_token)",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        return await handler(request)

    return check


def _carries(authorization: str, token: bytes) -> bool:
    """Bearer <token>, or Basic base64(<any user>:<token>); compared in constant time."""
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return hmac.compare_digest(value.strip().encode(), token)
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(decoded.partition(b":")[2], token)
    return False
