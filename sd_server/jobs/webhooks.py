"""Webhook delivery: POST a finished job's JSON in the background, with retries and exponential backoff."""

import asyncio
import logging

import httpx

from sd_server.errors import UnsafeWebhookError
from sd_server.security.webhook_urls import check_webhook_url

logger = logging.getLogger(__name__)


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
