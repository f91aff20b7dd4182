"""Webhook delivery: POST a finished job's JSON in the background, with retries and exponential backoff."""

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger(__name__)


class UnsafeWebhookError(ValueError):
    """The webhook URL is not http(s), or its host is private, loopback or link-local: answered with 422."""


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


class WebhookSender:
    """Sends webhooks from background tasks, so a slow or dead receiver never delays the device worker."""

    def __init__(self, retries: int, backoff_s: float, timeout_s: float, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.retries = retries
        self.backoff_s = backoff_s
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._tasks: set[asyncio.Task] = set()

    def send(self, url: str, payload: dict) -> None:
        """Start delivering ``payload`` to ``url``; returns at once."""
        task = asyncio.create_task(self.deliver(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, url: str, payload: dict) -> bool:
        """POST until a 2xx answer, at most 1 + retries times; True when delivered."""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                # Checked again at each delivery: the host's address may have changed since submission.
                await asyncio.to_thread(check_webhook_url, url, self.allow_private)
                response = await self._client.post(url, json=payload, headers={"User-Agent": "sd-api-webhook"})
                if response.is_success:
                    return True
                outcome = f"HTTP {response.status_code}"
            except UnsafeWebhookError as error:
                logger.warning("webhook %s refused: %s", url, error)
                return False
            except httpx.HTTPError as error:
                outcome = f"{type(error).__name__}: {error}"
            logger.warning("webhook %s attempt %d/%d failed: %s", url, attempt + 1, self.retries + 1, outcome)
        return False

    async def close(self) -> None:
        """Stop pending deliveries and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
