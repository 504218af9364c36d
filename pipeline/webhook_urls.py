"""Which reward webhook URLs the dispatcher may call: https, and only addresses on the public internet.

A tenant's webhook URL is configuration, but the name in it resolves at send time: without these rules a
URL (or a DNS answer that changes later) could point the dispatcher's signed POSTs at the host's loopback,
the cloud metadata service (link-local) or the private network. `allow_private_url = true` in the tenant's
rewards_webhook lifts both rules, for tests and internal receivers.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_public_address(address: str) -> bool:
    """Is `address` (an IP literal) globally routable: not loopback, link-local, private, reserved or
    multicast? An IPv4 address mapped into IPv6 is judged as the IPv4 address it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def url_problem(url: str, allow_private: bool) -> str | None:
    """Why the dispatcher must not call `url` (None: it may). Names are checked again when they resolve."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL with a host"
    if allow_private:
        return None
    if parts.scheme != "https":
        return "must be https:// (allow_private_url = true permits http:// for tests and internal receivers)"
    if host == "localhost" or host.endswith(".localhost"):
        return "names loopback (allow_private_url = true permits it)"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: its addresses are checked when it resolves
    if not is_public_address(host):
        return f"{host} is not a public address (allow_private_url = true permits it)"
    return None
