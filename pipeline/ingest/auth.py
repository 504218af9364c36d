"""Who sent a request: credential -> tenant, by the scheme each adapter declares (docs/sources.md §1.1).

The dispatch table `SCHEMES` is the only place that knows how a scheme reads a request; the receiver
looks a source's scheme up in its adapter (`AUTH`), so a new source with an existing scheme needs no
change here. Lookups never derive a tenant from key text, and compare secrets in constant time: a secret
is looked up by its SHA-256 digest, then compared with `hmac.compare_digest`. Rewards keys are a
credential of their own: a vendor write key never opens /rewards/v1.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import SecretStr

from pipeline.adapting import AuthScheme, credential_digest
from pipeline.config import Settings, Tenant
from pipeline.errors import AuthError
from pipeline.ingest.inputs import is_text, secret_bytes
from pipeline.ingest.jsonspan import first_element


@dataclass(frozen=True)
class Credentials:
    """Which tenant sent a request, plus the non-secret request metadata a scheme derives (api_key)."""

    tenant: Tenant
    vendor: Mapping[str, str] = field(default_factory=dict)


class SecretIndex:
    """Secret -> tenant by digest, confirmed with a constant-time comparison of the digests.

    The Credentials of a found tenant are made once, not per request (they carry no request data)."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, Credentials] = {}
        self._digest_of: dict[bytes, bytes] = {}

    def add(self, secrets: Iterable[SecretStr], tenant: Tenant) -> None:
        credentials = Credentials(tenant)
        for secret in secrets:
            digest = hashlib.sha256(secret.get_secret_value().encode()).digest()
            self._by_digest[digest] = credentials
            self._digest_of[digest] = digest

    def find(self, presented: bytes) -> Credentials | None:
        """The tenant whose secret this is; the dict probe sees only a digest, so timing says nothing."""
        if not presented:
            return None
        digest = hashlib.sha256(presented).digest()
        credentials = self._by_digest.get(digest)
        if credentials is None or not hmac.compare_digest(digest, self._digest_of[digest]):
            return None
        return credentials


class TenantDirectory:
    """Credential -> tenant lookups, built once from Settings."""

    def __init__(self, settings: Settings) -> None:
        self.by_write_key = SecretIndex()
        self.by_rewards_key = SecretIndex()
        self.by_usermaven_token = SecretIndex()
        self.by_license_code: dict[str, Tenant] = {}
        for tenant in settings.tenants:
            self.by_write_key.add(tenant.write_keys, tenant)
            self.by_rewards_key.add(tenant.rewards_keys, tenant)
            self.by_usermaven_token.add(tenant.usermaven_tokens, tenant)
            if tenant.webengage:
                self.by_license_code[tenant.webengage.license_code] = tenant

    def authenticate(self, scheme: AuthScheme, request: web.BaseRequest) -> Credentials:
        return SCHEMES[scheme](self, request)

    def write_key(self, request: web.BaseRequest) -> Credentials:
        credentials = self.by_write_key.find(secret_bytes(request.headers.get("X-API-KEY")))
        if credentials is None:
            raise AuthError("missing or unknown X-API-KEY")
        return credentials

    def rewards_key(self, request: web.BaseRequest) -> Credentials:
        """POST /rewards/v1: X-API-KEY must be one of a tenant's rewards_keys (a write key is not)."""
        credentials = self.by_rewards_key.find(secret_bytes(request.headers.get("X-API-KEY")))
        if credentials is None:
            raise AuthError("missing or unknown rewards key in X-API-KEY")
        return credentials

    def webengage_license(self, request: web.BaseRequest) -> Credentials:
        license_code = request.query.get("licenseCode", "")
        secret = request.query.get("secret", "")
        tenant = self.by_license_code.get(license_code)
        if (
            tenant is None
            or tenant.webengage is None
            or not is_text(secret)
            or not tenant.webengage.accepts(secret)
        ):
            raise AuthError("unknown licenseCode or wrong secret")
        return Credentials(tenant)

    def usermaven_token(self, request: web.BaseRequest) -> Credentials:
        token = request.query.get("token") or request.headers.get("X-Auth-Token") or ""
        if token and "." not in token:  # the API key alone, as the JavaScript SDK's README shows
            raise AuthError(
                "token has no server part: a server-to-server sender needs the token in the form "
                "API_KEY.SERVER_TOKEN (the API key alone does not authenticate it)"
            )
        found = self.by_usermaven_token.find(secret_bytes(token))
        if found is None:
            raise AuthError("missing or unknown token (expected API_KEY.SERVER_TOKEN)")
        # The body's api_key may be the key half or the whole token (the SDK sends the token it was
        # configured with): the adapter checks the latter against the token's digest, not the token.
        vendor = {"api_key": token.split(".", 1)[0], "token_sha256": credential_digest(token)}
        return Credentials(found.tenant, vendor=vendor)


SCHEMES: Mapping[AuthScheme, Callable[[TenantDirectory, web.BaseRequest], Credentials]] = {
    "write_key": TenantDirectory.write_key,
    "segment_write_key": TenantDirectory.write_key,
    "webengage_license": TenantDirectory.webengage_license,
    "usermaven_token": TenantDirectory.usermaven_token,
}


REPLAY_WINDOW_S = 300.0  # a signature is remembered with its body's digest this long...
REPLAY_ENTRIES = 50_000  # ...and at most this many (per receiver process), oldest forgotten first


class ReplayGuard:
    """Signatures seen recently, each with the digest of the body it came with: the same signature on a
    different body is a replay (a captured first element with forged events after it), the same body
    again is a sender's retry."""

    def __init__(self, window_s: float = REPLAY_WINDOW_S, entries: int = REPLAY_ENTRIES) -> None:
        self.window_s = window_s
        self.entries = entries
        self._seen: OrderedDict[tuple[str, bytes], tuple[float, bytes]] = OrderedDict()

    def check(self, tenant: str, signature: bytes, body: bytes) -> None:
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values()))[0] < now - self.window_s:
            self._seen.popitem(last=False)
        digest = hashlib.sha256(body).digest()
        key = (tenant, signature)
        seen = self._seen.get(key)
        if seen is not None and not hmac.compare_digest(seen[1], digest):
            raise AuthError("this X-Signature was already used with a different body")
        if seen is None:
            self._seen[key] = (now, digest)
            if len(self._seen) > self.entries:
                self._seen.popitem(last=False)


def verify_body(
    scheme: AuthScheme, tenant: Tenant, request: web.BaseRequest, body: bytes, replays: ReplayGuard
) -> None:
    """The checks a scheme makes on the body once it is read (only Segment's signature, today)."""
    if scheme == "segment_write_key":
        verify_segment_signature(tenant, request, body, replays)


def verify_segment_signature(
    tenant: Tenant, request: web.BaseRequest, body: bytes, replays: ReplayGuard
) -> None:
    """With a shared secret configured, no body gets in unchecked (docs/segment-signatures.md).

    X-Signature = hex HMAC-SHA1(secret, signed bytes), where the signed bytes are the whole body, or, for
    an array, the exact bytes of its first element: Segment's Webhook destination signs
    `JSON.stringify(data[0])` and sends `JSON.stringify(data)`. The other elements of such an array are
    not covered by the signature, so a tenant may refuse such arrays (`segment_refuse_arrays`, the safe
    choice); and a signature seen with another body within the replay window is refused.
    """
    if tenant.segment_shared_secret is None:
        return
    secret = tenant.segment_shared_secret.get_secret_value().encode()
    presented = secret_bytes(request.headers.get("X-Signature")).lower()
    expected = hmac.new(secret, body, hashlib.sha1).hexdigest().encode()
    if not hmac.compare_digest(expected, presented):
        element = first_element(body)
        if element is None:
            raise AuthError("X-Signature does not match the body")
        expected = hmac.new(secret, element, hashlib.sha1).hexdigest().encode()
        if not hmac.compare_digest(expected, presented):
            raise AuthError("X-Signature does not match the body (nor, for an array, its first element)")
        if tenant.segment_refuse_arrays:
            raise AuthError(
                "this tenant refuses arrays signed over their first element only (segment_refuse_arrays):"
                " send single events, or sign the whole body"
            )
    replays.check(tenant.id, presented, body)
