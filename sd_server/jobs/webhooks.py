"""Webhook delivery from the outbox: a task on the event loop POSTs each due delivery, pinned to the address that
was checked, signed the Standard Webhooks way with its key's secret, reading the answer's status and nothing of its
body, within an overall deadline; failures are retried with exponential backoff, and pending deliveries survive a
restart. A job's webhook goes out at the events its caller chose: its start, its progress (throttled), its end."""

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from config import Settings
from sd_server.domain.jobs import Job, WebhookEvent, utc_now
from sd_server.domain.trainings import Training
from sd_server.errors import ServiceError, UnsafeWebhookError, summary
from sd_server.jobs.events import Event, WorkEvent
from sd_server.observability.liveness import Liveness, PartState
from sd_server.persistence.outbox import Delivery, WebhookOutbox
from sd_server.security.webhook_signing import webhook_headers
from sd_server.security.webhook_urls import WebhookTarget, webhook_target

logger = logging.getLogger(__name__)
JOB_EVENTS = {"started": WebhookEvent.start, "progress": WebhookEvent.progress}  # bus event -> webhook event
POLL_S = 1.0  # how often the outbox is read for retries that have come due
CONCURRENT_DELIVERIES = 8


@dataclass(frozen=True)
class UnkeptDelivery:
    """A delivery not in the outbox yet (the database was away, or a start or progress event handed over by a device
    thread), whose it is, and the key that signs it."""

    url: str
    payload: dict[str, Any]
    request_id: str | None
    subject: dict[str, str]
    key_id: str | None = None


class WebhookSender:
    """Keeps jobs' and trainings' webhooks in the outbox (``on_event``, from any thread) and delivers them, signed
    with the secret ``secret_of`` gives for the submitting key (``start``)."""

    def __init__(
        self,
        settings: Settings,
        outbox: WebhookOutbox,
        job_payload: Callable[[Job], dict[str, Any]],
        training_payload: Callable[[Training], dict[str, Any]],
        liveness: Liveness,
        secret_of: Callable[[str], str | None] = lambda key_id: None,
    ) -> None:
        self.settings, self.outbox, self.liveness, self.secret_of = settings, outbox, liveness, secret_of
        self.job_payload, self.training_payload = job_payload, training_payload
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_s, trust_env=False, follow_redirects=False)
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._slots = asyncio.Semaphore(CONCURRENT_DELIVERIES)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unkept: list[UnkeptDelivery] = []  # deliveries for the delivery loop to put in the outbox
        self._unkept_lock = threading.Lock()
        self._last_progress: dict[str, float] = {}  # job id -> when its last progress webhook was kept

    def on_event(self, event: Event) -> None:
        """A bus listener, on the thread that emits: the webhook of a job or training that ended (stored, not deleted)
        goes into the outbox at once; a job's start and progress, when its caller asked for them, go to the delivery
        loop to keep (a device thread never waits on the database), progress at most every
        SD_WEBHOOK_PROGRESS_INTERVAL_S."""
        if not isinstance(event, WorkEvent) or not event.work.webhook_url:
            return
        if event.ended:
            with self._unkept_lock:
                self._last_progress.pop(event.work.id, None)
        if event.work.deleted:
            return
        work, url = event.work, event.work.webhook_url
        if isinstance(work, Training):
            if event.ended:
                self._keep(UnkeptDelivery(url, self.training_payload(work), work.request_id, {"training_id": work.id}, work.key_id))
            return
        assert isinstance(work, Job)
        kind = WebhookEvent.completed if event.ended else JOB_EVENTS.get(event.name)
        if kind is None or kind not in work.webhook_events or (kind is WebhookEvent.progress and not self._progress_due(work)):
            return
        delivery = UnkeptDelivery(url, self.job_payload(work), work.request_id, {"job_id": work.id}, work.key_id)
        if kind is WebhookEvent.completed:
            self._keep(delivery)
        else:
            self._hand_over(delivery)

    def _progress_due(self, job: Job) -> bool:
        """True when SD_WEBHOOK_PROGRESS_INTERVAL_S has passed since the job's last progress webhook (which is now)."""
        now = time.monotonic()
        with self._unkept_lock:
            if job.status.is_terminal:
                return False  # a progress event that lost the race with the job's end
            if now - self._last_progress.get(job.id, -math.inf) < self.settings.webhook_progress_interval_s:
                return False
            self._last_progress[job.id] = now
            return True

    def _keep(self, delivery: UnkeptDelivery) -> None:
        """Put a delivery in the outbox; one the database does not take now waits in memory and is put there by the
        delivery loop once the database is back (a restart meanwhile loses it)."""
        try:
            self.outbox.add(delivery.url, delivery.payload, delivery.key_id, **delivery.subject)
        except ServiceError as error:
            what = " ".join(f"{name.removesuffix('_id')} {value}" for name, value in delivery.subject.items())  # "job <id>"
            logger.error("could not keep the webhook of %s yet: %s; it is kept until the database is back", what, error.message, extra={"request_id": delivery.request_id})
            self._hand_over(delivery)
            return
        self._wake_loop()

    def _hand_over(self, delivery: UnkeptDelivery) -> None:
        """Leave a delivery for the delivery loop to put in the outbox."""
        with self._unkept_lock:
            self._unkept.append(delivery)
        self._wake_loop()

    def _wake_loop(self) -> None:
        """Wake the delivery loop (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _keep_unkept(self) -> None:
        """Put the deliveries that waited for the database into the outbox, as long as it takes them."""
        while True:
            with self._unkept_lock:
                if not self._unkept:
                    return
                delivery = self._unkept[0]
            self.outbox.add(delivery.url, delivery.payload, delivery.key_id, **delivery.subject)  # raises while the database is away
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
            secret = await asyncio.to_thread(self.secret_of, delivery.key_id) if delivery.key_id else None
            body = delivery.payload.encode()
            signed = webhook_headers(delivery.message_id, int(time.time()), body, secret or self.settings.webhook_secret)
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                return await self._post(target, body, signed)
        except UnsafeWebhookError as error:  # checked again at each attempt: the host's address may have changed
            return f"refused: {error.message}"
        except TimeoutError:
            return f"no answer within {self.settings.webhook_timeout_s:g} s (SD_WEBHOOK_TIMEOUT_S)"
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"

    async def _post(self, target: WebhookTarget, body: bytes, signed: dict[str, str]) -> str | None:
        """Send the request and read the status line and headers only: the body, however long, is never read."""
        headers = {"Host": target.host_header, "Content-Type": "application/json", "User-Agent": "sd-api-webhook", **signed}
        extensions = {"sni_hostname": target.tls_name} if target.tls_name else {}
        request = self._client.build_request("POST", target.url, content=body, headers=headers, extensions=extensions)
        response = await self._client.send(request, stream=True)
        await response.aclose()
        return None if response.is_success else f"HTTP {response.status_code}"
