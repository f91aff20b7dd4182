"""Where webhooks may go: http(s) URLs whose host resolves to public addresses only (no SSRF into the server's
network), unless SD_WEBHOOK_ALLOW_PRIVATE."""

import ipaddress
import socket
from urllib.parse import urlsplit

from sd_server.errors import UnsafeWebhookError


def check_webhook_url(url: str, allow_private: bool) -> None:
    """Refuse URLs that could reach inside the server's network (SSRF), unless SD_WEBHOOK_ALLOW_PRIVATE."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookError(f"webhook_url must be an http(s) URL with a host, not {url!r}")
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)}
    except socket.gaierror as error:
        raise UnsafeWebhookError(f"webhook host {parts.hostname!r} does not resolve: {error}") from error
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise UnsafeWebhookError(
                f"webhook host {parts.hostname!r} resolves to {ip}, a non-public address; "
                "set SD_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
