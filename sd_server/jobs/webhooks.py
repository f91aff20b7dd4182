"""Webhook delivery from the outbox: a task on the event loop POSTs each due delivery, pinned to the address that
was checked, reading the answer's status and nothing of its body, within an overall deadline; failures are retried
with exponential backoff, and pending deliveries survive a restart."""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from config import Settings
from sd_server.domain.jobs import Job, utc_now
from sd_server.domain.trainings import Training
from sd_server.errors import ServiceError, UnsafeWebhookError, summary
from sd_server.jobs.events import Event, WorkEvent
from sd_server.observability.liveness import Liveness, PartState
from sd_server.persistence.outbox import Delivery, WebhookOutbox
from sd_server.security.webhook_urls import WebhookTarget, webhook_target

logger = logging.getLogger(__name__)
POLL_S = 1.0  # how often the outbox is read for retries that have come due
CONCURRENT_DELIVERIES = 8


@dataclass(frozen=True)
class UnkeptDelivery:
    """A delivery the outbox did not take (the database was away), and whose it is."""

    url: str
    payload: dict[str, Any]
    request_id: str | None
    subject: dict[str, str]


class WebhookSender:
    """Keeps finished jobs' and trainings' webhooks in the outbox (``job_ended``, ``training_ended``, from any
    thread) and delivers them (``start``)."""

    def __init__(
        self,
        settings: Settings,
        outbox: WebhookOutbox,
        job_payload: Callable[[Job], dict[str, Any]],
        training_payload: Callable[[Training], dict[str, Any]],
        liveness: Liveness,
    ) -> None:
        self.settings, self.outbox, self.liveness = settings, outbox, liveness
        self.job_payload, self.training_payload = job_payload, training_payload
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_s, trust_env=False, follow_redirects=False)
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._slots = asyncio.Semaphore(CONCURRENT_DELIVERIES)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unkept: list[UnkeptDelivery] = []  # deliveries the database did not take when their job or training ended
        self._unkept_lock = threading.Lock()

    def on_event(self, event: Event) -> None:
        """A bus listener: keep the webhook of a job or training that ended (stored, not deleted) in the outbox and
        wake the sender, on the thread that ended it."""
        if not isinstance(event, WorkEvent) or not event.ended or not event.work.webhook_url or event.work.deleted:
            return
        work = event.work
        if isinstance(work, Job):
            self._keep(event.work.webhook_url, self.job_payload(work), work.request_id, job_id=work.id)
        elif isinstance(work, Training):
            self._keep(event.work.webhook_url, self.training_payload(work), work.request_id, training_id=work.id)

    def _keep(self, url: str, payload: dict[str, Any], request_id: str | None, **subject: str) -> None:
        """Put a delivery in the outbox; one the database does not take now waits in memory and is put there by the
        delivery loop once the database is back (a restart meanwhile loses it)."""
        try:
            self.outbox.add(url, payload, **subject)
        except ServiceError as error:
            what = " ".join(f"{name.removesuffix('_id')} {value}" for name, value in subject.items())  # "job <id>"
            logger.error("could not keep the webhook of %s yet: %s; it is kept until the database is back", what, error.message, extra={"request_id": request_id})
            with self._unkept_lock:
                self._unkept.append(UnkeptDelivery(url, payload, request_id, subject))
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _keep_unkept(self) -> None:
        """Put the deliveries that waited for the database into the outbox, as long as it takes them."""
        while True:
            with self._unkept_lock:
                if not self._unkept:
                    return
                delivery = self._unkept[0]
            self.outbox.add(delivery.url, delivery.payload, **delivery.subject)  # raises while the database is away
            with self._unkept_lock:
                self._unkept.remove(delivery)

    def start(self) -> None:
        """Start delivering on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())
        self.liveness.register("webhooks", alive=lambda: self._task is not None and not self._task.done())

    async def close(self) -> None:
        """Stop delivering (what is pending stays in the outbox) and close the HTTP client."""
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _run(self) -> None:
        """Deliver what is due, then wait for a new delivery or the next retry; no error ends the loop."""
        deliveries: set[asyncio.Task[None]] = set()
        while not self._closing:
            try:
                if self._unkept:  # only while the database was away: no thread hop on every poll
                    await asyncio.to_thread(self._keep_unkept)
                due = await asyncio.to_thread(self.outbox.due, CONCURRENT_DELIVERIES * 4, set(self._in_flight))
                for delivery in due:
                    self._in_flight.add(delivery.id)
                    task = asyncio.create_task(self._deliver(delivery))
                    deliveries.add(task)
                    task.add_done_callback(deliveries.discard)
                self.liveness.set("webhooks", PartState.ok)
            except Exception as error:
                logger.exception("the webhook loop failed; it goes on")
                self.liveness.set("webhooks", PartState.failing, summary(error))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):  # not wait_for: in 3.11 it can swallow the cancel of close()
                    await self._wake.wait()

    async def _deliver(self, delivery: Delivery) -> None:
        """One attempt, then its outcome in the outbox."""
        try:
            async with self._slots:
                outcome = await self._attempt(delivery)
            if outcome is None:
                await asyncio.to_thread(self.outbox.delivered, delivery)
                return
            retries_left = delivery.attempts < self.settings.webhook_retries
            retry_at = utc_now() + timedelta(seconds=self.settings.webhook_backoff_s * 2**delivery.attempts) if retries_left else None
            logger.warning("webhook of %s, attempt %d: %s", delivery.subject, delivery.attempts + 1, outcome)
            await asyncio.to_thread(self.outbox.failed_attempt, delivery, outcome, retry_at)
        except Exception:
            logger.exception("recording webhook delivery %d failed", delivery.id)
        finally:
            self._in_flight.discard(delivery.id)
            self._wake.set()

    async def _attempt(self, delivery: Delivery) -> str | None:
        """POST the payload; None when the receiver answered 2xx, else what went wrong."""
        try:
            target = await asyncio.to_thread(webhook_target, delivery.url, self.settings.webhook_allow_private)
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                return await self._post(target, delivery.payload)
        except UnsafeWebhookError as error:  # checked again at each attempt: the host's address may have changed
            return f"refused: {error.message}"
        except TimeoutError:
            return f"no answer within {self.settings.webhook_timeout_s:g} s (SD_WEBHOOK_TIMEOUT_S)"
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"

    async def _post(self, target: WebhookTarget, payload: str) -> str | None:
        """Send the request and read the status line and headers only: the body, however long, is never read."""
        headers = {"Host": target.host_header, "Content-Type": "application/json", "User-Agent": "sd-api-webhook"}
        extensions = {"sni_hostname": target.tls_name} if target.tls_name else {}
        request = self._client.build_request("POST", target.url, content=payload.encode(), headers=headers, extensions=extensions)
        response = await self._client.send(request, stream=True)
        await response.aclose()
        return None if response.is_success else f"HTTP {response.status_code}"
