"""Who sent a request: credential -> tenant, by the scheme each adapter declares (sources.md §1.1).

The dispatch table `SCHEMES` is the only place that knows how a scheme reads a request; the receiver
looks a source's scheme up in its adapter (`AUTH`), so a new source with an existing scheme needs no
change here. Lookups never derive a tenant from key text, and compare secrets in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from pipeline.adapting import AuthScheme
from pipeline.config import Settings, Tenant
from pipeline.errors import AuthError


@dataclass(frozen=True)
class Credentials:
    """Which tenant sent a request, plus the non-secret request metadata a scheme derives (api_key)."""

    tenant: Tenant
    vendor: Mapping[str, str] = field(default_factory=dict)


class TenantDirectory:
    """Credential -> tenant lookups, built once from Settings."""

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

    def authenticate(self, scheme: AuthScheme, request: web.Request) -> Credentials:
        return SCHEMES[scheme](self, request)

    def write_key(self, request: web.Request) -> Credentials:
        key = request.headers.get("X-API-KEY")
        tenant = self.by_write_key.get(key.encode()) if key else None
        if tenant is None:
            raise AuthError("missing or unknown X-API-KEY")
        return Credentials(tenant)

    def webengage_license(self, request: web.Request) -> Credentials:
        license_code = request.query.get("licenseCode", "")
        secret = request.query.get("secret", "")
        tenant = self.by_license_code.get(license_code)
        if tenant is None or tenant.webengage is None or not tenant.webengage.accepts(secret):
            raise AuthError("unknown licenseCode or wrong secret")
        return Credentials(tenant)

    def usermaven_token(self, request: web.Request) -> Credentials:
        token = request.query.get("token") or request.headers.get("X-Auth-Token") or ""
        tenant = self.by_usermaven_token.get(token.encode())
        if tenant is None or "." not in token:
            raise AuthError("missing or unknown token (expected API_KEY.SERVER_TOKEN)")
        return Credentials(tenant, vendor={"api_key": token.split(".", 1)[0]})


SCHEMES: Mapping[AuthScheme, Callable[[TenantDirectory, web.Request], Credentials]] = {
    "write_key": TenantDirectory.write_key,
    "segment_write_key": TenantDirectory.write_key,
    "webengage_license": TenantDirectory.webengage_license,
    "usermaven_token": TenantDirectory.usermaven_token,
}


def verify_body(scheme: AuthScheme, tenant: Tenant, request: web.Request, body: bytes) -> None:
    """The checks a scheme makes on the body once it is read (only Segment's signature, today)."""
    if scheme == "segment_write_key":
        verify_segment_signature(tenant, request, body)


def verify_segment_signature(tenant: Tenant, request: web.Request, body: bytes) -> None:
    """With a shared secret configured, X-Signature = hex HMAC-SHA1(secret, body) (sources.md §4.2).

    Segment's batched sends sign only the first element, so a JSON array body is not checked.
    """
    if tenant.segment_shared_secret is None or body.lstrip()[:1] == b"[":
        return
    expected = hmac.new(
        tenant.segment_shared_secret.get_secret_value().encode(), body, hashlib.sha1
    ).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("X-Signature", "").lower()):
        raise AuthError("X-Signature does not match the body")
