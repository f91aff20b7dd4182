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


# IANA's special-purpose blocks that are not globally reachable and that Python 3.11's ``is_global`` still calls
# global (later Pythons know some of them); what ``is_global`` refuses is refused as well.
NOT_GLOBAL = [
    ipaddress.ip_network(block)
    for block in (
        "192.0.0.0/24",  # IETF protocol assignments (192.0.0.9 and .10 are global: below)
        "192.88.99.0/24",  # 6to4 relay anycast, deprecated
        "198.18.0.0/15",  # benchmarking
        "240.0.0.0/4",  # reserved
        "fec0::/10",  # site-local, deprecated
        "64:ff9b:1::/48",  # local-use IPv4/IPv6 translation
        "2001::/23",  # IETF protocol assignments (some global exceptions below)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing SIDs
    )
]
GLOBAL_EXCEPTIONS = [
    ipaddress.ip_network(block)
    for block in ("192.0.0.9/32", "192.0.0.10/32", "2001:1::1/128", "2001:1::2/128", "2001:3::/32", "2001:4:112::/48", "2001:20::/28")
]
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: a DNS64 resolver's answer for an IPv4 host


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64
    (64:ff9b::a.b.c.d), 6to4 or Teredo."""
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if address in NAT64 or int(address) >> 32 == 0:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """True for a globally reachable unicast address. An IPv6 address that carries an IPv4 one is judged by it: a
    mapped, compatible or NAT64 address stands for its IPv4 host; a 6to4 or Teredo one must be public both ways."""
    if isinstance(address, ipaddress.IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        if not is_public(inner):
            return False
        if address.ipv4_mapped or address in NAT64 or int(address) >> 32 == 0:
            return True
    if isinstance(address, ipaddress.IPv6Address) and address not in GLOBAL_UNICAST_V6:
        return False
    if any(address in network for network in GLOBAL_EXCEPTIONS):
        return True
    special = address.is_multicast or address.is_reserved or address.is_unspecified or address.is_loopback or address.is_link_local
    return address.is_global and not special and not address.is_private and not any(address in network for network in NOT_GLOBAL)


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
