"""The jobs service: what requests do with jobs. Admission (limits, the Idempotency-Key, the job record), the
stored init image and mask, cancel and delete, reading jobs back (the live record while active), and the recovery
of the last run's jobs at start."""

import logging
from datetime import datetime
from functools import partial

from config import Settings
from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, JobQuery, JobStatus, JobStore, WebhookEvent
from sd_server.engine.interface import Engine
from sd_server.errors import JobFinishedError, ServiceError
from sd_server.jobs import admission
from sd_server.jobs.dispatch import Dispatcher
from sd_server.jobs.events import EventBus
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.recovery import Restart, on_restart
from sd_server.jobs.writer import Writer
from sd_server.registry import ModelRegistry
from sd_server.storage.images import ImageStorage

logger = logging.getLogger(__name__)


class Jobs:
    """Submits, cancels, deletes and finds jobs; the queue and the dispatcher run them."""

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        dispatcher: Dispatcher,
        store: JobStore,
        writer: Writer,
        bus: EventBus,
        engine: Engine,
        registry: ModelRegistry,
        storage: ImageStorage,
    ) -> None:
        self.settings, self.queue, self.dispatcher, self.store, self.writer = settings, queue, dispatcher, store, writer
        self.bus, self.engine, self.registry, self.storage = bus, engine, registry, storage

    def submit(
        self,
        request: Generation,
        synchronous: bool,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        inputs: dict[str, bytes] | None = None,
        share: admission.Share = admission.Share(),
        webhook_events: frozenset[WebhookEvent] = admission.DEFAULT_WEBHOOK_EVENTS,
    ) -> tuple[Job, bool]:
        """Queue a job for ``request`` (with its init image and mask PNGs as ``inputs``, stored beside its images);
        returns it and whether it is new (False: an idempotent repeat).

        A synchronous job keeps its PNGs for the request that waits on it, and stores them if SD_SAVE_IMAGES;
        an asynchronous one always stores them (its result links to them) and keeps no copy in memory.
        """
        model = self.registry.serving(request.user_id)
        job = admission.new_job(self.settings, request, model, synchronous, webhook_url, idempotency_key, request_id, share, webhook_events)
        if job.idempotency_key and (existing := self.find_by_idempotency_key(job.idempotency_key)):
            admission.check_repeat(job.fingerprint, existing, idempotency_key or "")
            return existing, False
        job.inputs = dict(inputs or {})
        job.prompt_chunks = self._prompt_chunks(job)
        self.queue.admit(job, lambda backlog: admission.check_capacity(self.settings, job, backlog, self.dispatcher.retry_after_s))
        stored = None
        try:
            self._store_inputs(job)
            stored = self.store.add(job)  # a racing retry of the same key finds its original here
            if stored is job:
                self.writer.track([job])
        finally:
            self.queue.settle(job, enqueue=stored is job)
            if stored is not job:
                self._delete_inputs(job)
        if stored is not job:
            admission.check_repeat(job.fingerprint, stored, idempotency_key or "")
            return self.writer.live(stored), False
        self.bus.emit(job, "queued")
        return job, True

    def cancel(self, job: Job, keep_what_was_made: bool = False) -> None:
        """Cancel ``job``: a queued one leaves the queue now, a running one stops at its next step. With
        ``keep_what_was_made`` (A1111's interrupt) a running job succeeds with its images as the steps so far made
        them, when every job of its batch stops so (else it is cancelled: the others' steps go on)."""

        def request_cancel() -> list[Job]:
            if job.status is JobStatus.queued and self.queue.position(job) is not None:
                self.queue.end(job, JobStatus.cancelled)
                return [job]
            if job.status.is_terminal:
                raise JobFinishedError(f"job {job.id} has already {job.status.value}")
            if keep_what_was_made:
                job.finish_requested = True
            else:
                job.cancel_requested = True
            return []

        self.writer.announce(self.queue.under_lock(request_cancel))

    def delete(self, job: Job) -> None:
        """Cancel the job if it is active, then delete its images and its record. Images a finishing job stores
        after this are deleted by the encoder (``succeed`` refuses a deleted job)."""

        def mark_deleted() -> list[str]:
            job.deleted = True
            return [image.key for image in job.images if image.key]

        keys = self.queue.under_lock(mark_deleted)
        if not job.status.is_terminal:
            try:
                self.cancel(job)
            except JobFinishedError:
                keys = [image.key for image in job.images if image.key]  # it succeeded meanwhile: its images are listed now
        for key in keys:
            self.storage.delete(key)
        self._delete_inputs(job)
        self.store.delete(job.id)
        self.writer.forget(job.id)

    def get(self, job_id: str) -> Job | None:
        """The live job while it is active (or its end is not stored yet), else its record, or None."""
        live = self.writer.current(job_id)
        return live if isinstance(live, Job) else self.store.get(job_id)

    def find_by_idempotency_key(self, key: str) -> Job | None:
        """The job submitted with that (user-scoped) Idempotency-Key, live if it is active."""
        stored = self.store.find_by_idempotency_key(key)
        return self.writer.live(stored) if stored else None

    def page(self, query: JobQuery) -> tuple[list[Job], int, tuple[datetime, str] | None]:
        """A page of jobs (``JobStore.page``), each the live record while it is active."""
        jobs, total, cursor = self.store.page(query)
        return [self.writer.live(job) for job in jobs], total, cursor

    def owner_of_image(self, key: str) -> str | None:
        """The user whose job made the stored image ``key``."""
        return self.store.owner_of_image(key)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, ...; None when it is not queued."""
        return self.queue.position(job)

    def active_jobs(self, user_id: str) -> list[Job]:
        """The user's running jobs, then their queued ones."""
        return self.queue.active_jobs(user_id)

    def recover(self) -> None:
        """Queue again what the last run left queued; a job that was running is re-queued once, then failed."""
        unfinished = self.store.unfinished()
        self.writer.track(unfinished)
        requeued, ended = [], []
        for job in unfinished:
            self._reload_inputs(job)
            if job.input_keys and not job.inputs:
                error = ServiceError("its init image or mask is gone from storage; submit it again")
            elif on_restart(job.status.phase, job.attempts) is Restart.fail:
                error = ServiceError("the server stopped twice while this job ran; submit it again")
            else:
                requeued.append(job)
                continue
            self.queue.under_lock(partial(self.queue.end, job, JobStatus.failed, error))
            ended.append(job)
        interrupted = [job for job in requeued if job.status is not JobStatus.queued]
        self.queue.put_back(requeued)
        self.writer.persist(interrupted)
        self.writer.announce(ended)
        if requeued:
            logger.info("re-queued %d unfinished jobs from the last run", len(requeued))

    def _store_inputs(self, job: Job) -> None:
        """Store the job's init image and mask beside its images (a restart runs it from them)."""
        for name, key in job.input_keys.items():
            self.storage.put(key, job.inputs[name])

    def _delete_inputs(self, job: Job) -> None:
        """Delete the job's stored init image and mask."""
        for key in job.input_keys.values():
            self.storage.delete(key)

    def _reload_inputs(self, job: Job) -> None:
        """Read back the init image and mask of a job from the last run (none when one is missing), and count its
        prompt chunks again."""
        try:
            job.inputs = {name: self.storage.get(key) for name, key in job.input_keys.items()}
        except ServiceError as error:
            logger.error("job %s: %s", job.id, error.message)
            job.inputs = {}
        job.prompt_chunks = self._prompt_chunks(job)

    def _prompt_chunks(self, job: Job) -> int:
        """How many chunks the job's longer prompt takes with its base's tokenizer (jobs batch by it)."""
        return self.engine.prompt_chunks(job.model.base, [job.request.prompt, job.request.negative_prompt or ""])
