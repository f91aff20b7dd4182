"""Where webhooks may go: http(s) URLs whose host resolves to public unicast addresses only (no SSRF into the
server's network), unless SD_WEBHOOK_ALLOW_PRIVATE. A delivery connects to the very address that was checked
(pinned), so DNS rebinding cannot slip another one in between."""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from sd_server.errors import UnsafeWebhookError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL with its host replaced by the checked address, the Host header to send, and for https the
    name the server's certificate must carry (TLS SNI)."""

    url: str
    host_header: str
    tls_name: str | None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), 6to4 or Teredo."""
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address.teredo:
        return address.teredo[1]
    return ipaddress.IPv4Address(int(address)) if int(address) >> 32 == 0 else None


def is_public(address: IPAddress) -> bool:
    """True for a global unicast address (and, for IPv6, one that carries no private IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address) and (inner := embedded_ipv4(address)) is not None and not is_public(inner):
        return False
    special = address.is_multicast or address.is_reserved or address.is_unspecified or address.is_loopback
    return address.is_global and not special and not address.is_link_local and not address.is_private


def resolve(url: str) -> tuple[str, list[IPAddress]]:
    """The URL's host and the addresses it resolves to; UnsafeWebhookError when it has none."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as error:  # a port out of range
        raise UnsafeWebhookError(f"webhook_url has an invalid port: {error}") from error
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeWebhookError(f"webhook_url must be an http(s) URL with a host, not {url[:200]!r}")
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as error:  # no such host; a label over 63 characters
        raise UnsafeWebhookError(f"webhook host {host[:100]!r} does not resolve: {error}") from error
    return host, [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def check_addresses(host: str, addresses: list[IPAddress], allow_private: bool) -> None:
    """Refuse a host with any non-public address, unless SD_WEBHOOK_ALLOW_PRIVATE."""
    for address in addresses:
        if not allow_private and not is_public(address):
            raise UnsafeWebhookError(
                f"webhook host {host[:100]!r} resolves to {address}, a non-public address; "
                "set SD_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )


def check_webhook_url(url: str, allow_private: bool) -> None:
    """Refuse URLs that could reach inside the server's network (SSRF), unless SD_WEBHOOK_ALLOW_PRIVATE."""
    host, addresses = resolve(url)
    check_addresses(host, addresses, allow_private)


def webhook_target(url: str, allow_private: bool) -> WebhookTarget:
    """Resolve and check ``url`` now, and pin the delivery to the first address checked."""
    host, addresses = resolve(url)
    check_addresses(host, addresses, allow_private)
    parts = urlsplit(url)
    address = addresses[0]
    literal = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host_header = parts.netloc.rsplit("@", 1)[-1]
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return WebhookTarget(pinned, host_header, host if parts.scheme == "https" else None)
