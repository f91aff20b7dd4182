"""The job queue: a bounded FIFO of jobs and the jobs running now, guarded by one condition. Requests submit and
cancel here; the worker threads (``workers``) take batches and models to load from here and end jobs here."""

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from config import Settings
from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, JobStatus, JobStore, StoredImage, utc_now
from sd_server.domain.models import UserModel
from sd_server.engine.interface import Engine
from sd_server.errors import JobFinishedError, JobTimeoutError, ServiceError
from sd_server.jobs import admission
from sd_server.jobs.batching import companions, images_in
from sd_server.jobs.events import JobEvents
from sd_server.registry import ModelRegistry
from sd_server.storage.images import ImageStorage

logger = logging.getLogger(__name__)


class QueueObserver(Protocol):
    """Told about batches and finished jobs (the Prometheus metrics)."""

    def batch_ran(self, images: int, seconds: float, steps: int) -> None: ...

    def job_finished(self, status: str) -> None: ...


class JobQueue:
    """Queued jobs in order, running jobs, and the figures of the batches run so far."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: ModelRegistry,
        store: JobStore,
        storage: ImageStorage,
        events: JobEvents | None = None,
    ) -> None:
        self.settings, self.engine, self.registry, self.store, self.storage = settings, engine, registry, store, storage
        self.events = events or JobEvents()
        self.max_batch_size = settings.max_batch_size or engine.default_max_batch_size
        self.batches_run = 0
        self.images_run = 0
        self.observer: QueueObserver | None = None
        self.ready = False
        self.not_ready_reason = "the default model is loading"
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._seconds_per_batch = 1.0

    # --- requests ------------------------------------------------------------------------------------

    def submit(
        self,
        request: Generation,
        synchronous: bool,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job for ``request``; returns it and whether it is new (False: an idempotent repeat).

        A synchronous job keeps its PNGs for the request that waits on it, and stores them if SD_SAVE_IMAGES;
        an asynchronous one always stores them (its result links to them) and keeps no copy in memory.
        """
        model = self.registry.get(request.user_id)
        job = admission.new_job(self.settings, request, model, synchronous, webhook_url, idempotency_key, request_id)
        with self._condition:  # held from the idempotency lookup to the insert: a retry racing its original finds it
            if job.idempotency_key and (existing := self.store.find_by_idempotency_key(job.idempotency_key)):
                admission.check_repeat(job, existing, idempotency_key or "")
                return existing, False
            active = sum(1 for other in self._queue + self._running if other.user_id == request.user_id)
            admission.check_capacity(self.settings, request.user_id, active, len(self._queue), self._retry_after_s())
            self._queue.append(job)
            self.store.add(job)
            self._condition.notify_all()
        self.events.emit(job, "queued")
        return job, True

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a queued one leaves the queue now, a running one stops at its next step."""
        with self._condition:
            if job.status is JobStatus.queued:
                self._queue.remove(job)
                self.end(job, JobStatus.cancelled)
            elif job.status is JobStatus.running:
                job.cancel_requested = True
            else:
                raise JobFinishedError(f"job {job.id} has already {job.status.value}")

    def delete(self, job: Job) -> None:
        """Cancel the job if it is active, then delete its images and its record."""
        if not job.status.is_terminal:
            with contextlib.suppress(JobFinishedError):
                self.cancel(job)
        for image in job.images:
            if image.key:
                self.storage.delete(image.key)
        self.store.delete(job.id)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 after it, ...; None once the job is no longer queued."""
        with self._condition:
            return self._queue.index(job) + 1 if job in self._queue else None

    def stats(self) -> dict:
        """Queue depth and batching figures for /health."""
        with self._condition:
            queued, running = len(self._queue), len(self._running)
        return {
            "queued": queued,
            "running": running,
            "max_queue": self.settings.max_queue,
            "max_batch_size": self.max_batch_size,
            "batches_run": self.batches_run,
            "mean_batch_size": round(self.images_run / self.batches_run, 3) if self.batches_run else 0.0,
        }

    # --- start and stop ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Queue again what the last run left queued; a job that was running is re-queued once, then failed."""
        for job in self.store.unfinished():
            if job.status is JobStatus.running and job.attempts >= 1:
                with self._condition:
                    self.end(job, JobStatus.failed, ServiceError("the server stopped twice while this job ran; submit it again"))
                continue
            if job.status is JobStatus.running:
                job.attempts += 1
                job.status, job.started_at, job.step = JobStatus.queued, None, 0
                self.store.save(job)
            self._queue.append(job)
        if self._queue:
            logger.info("re-queued %d unfinished jobs from the last run", len(self._queue))

    def close(self) -> None:
        """Stop handing out work: the workers finish what they hold and return."""
        with self._condition:
            self._stopping = True
            self.ready, self.not_ready_reason = False, "shutting down"
            self._condition.notify_all()

    # --- for the loader thread -------------------------------------------------------------------------

    def next_model_to_load(self) -> tuple[UserModel, set[str]] | None:
        """Wait for a queued job whose model needs loading: its model, and the checkpoints that must stay on the
        device (those of the running batch and of the jobs queued ahead of it). None when stopping."""
        with self._condition:
            while not self._stopping:
                keep = {job.model.base for job in self._running}
                for job in self._queue:
                    if self.engine.needs_loading(job.model):
                        return job.model, keep
                    keep.add(job.model.base)
                self._condition.wait(timeout=1.0)
        return None

    def model_prepared(self, loaded: bool) -> None:
        """After a load: wake the device worker, or (no room) wait until a running or queued-ahead job ends."""
        with self._condition:
            if loaded:
                self._condition.notify_all()
            else:
                self._condition.wait(timeout=1.0)

    def fail_queued(self, matches: Callable[[Job], bool], error: ServiceError) -> None:
        """Take the queued jobs that ``matches`` picks off the queue, failed with ``error``."""
        with self._condition:
            for job in [job for job in self._queue if matches(job)]:
                self._queue.remove(job)
                self.end(job, JobStatus.failed, error)

    # --- for the device worker -------------------------------------------------------------------------

    def next_batch(self) -> list[Job] | None:
        """Wait for the first queued job whose model is ready, then up to SD_BATCH_WAIT_MS for companions; take
        them off the queue as running. Jobs whose model is still loading wait without holding up the others."""
        with self._condition:
            while True:
                self.fail_queued(self.past_deadline, self.timeout_error())
                if self._stopping:
                    return None
                first = next((job for job in self._queue if self.engine.is_ready(job.model)), None)
                if first is None:
                    self._condition.wait(timeout=1.0)
                    continue
                wait_until = time.monotonic() + self.settings.batch_wait_ms / 1000
                while images_in(companions(first, self._queue, self.max_batch_size)) < self.max_batch_size and not self._stopping:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(timeout=remaining)
                if first in self._queue:
                    break  # else the first job was cancelled while waiting: start over
            batch = companions(first, self._queue, self.max_batch_size)
            for job in batch:
                self._queue.remove(job)
                job.status, job.started_at = JobStatus.running, utc_now()
                job.batch_size, job.step = images_in(batch), 0
                self.store.save(job)
            self._running.extend(batch)
        for job in batch:
            self.events.emit(job, "started")
        return batch

    def progress(self, batch: list[Job], step: int, total: int) -> None:
        """After a denoising step: end the batch's cancelled and timed-out jobs, report progress of the others."""
        with self._condition:
            for job in batch:
                if job.status is not JobStatus.running:
                    continue
                if job.cancel_requested:
                    self.end(job, JobStatus.cancelled)
                elif self.past_deadline(job):
                    self.end(job, JobStatus.failed, self.timeout_error())
                else:
                    job.step, job.total_steps = step, total
                    self.events.emit(job, "progress", {"job_id": job.id, "step": step, "total": total})

    def all_ended(self, batch: list[Job]) -> bool:
        """True when no job of the batch is running any more (the pipeline call may stop)."""
        with self._condition:
            return all(job.status is not JobStatus.running for job in batch)

    def record_batch(self, batch: list[Job], seconds: float) -> None:
        """Count the batch, and keep a moving average of its time for Retry-After."""
        with self._condition:
            self.batches_run += 1
            self.images_run += images_in(batch)
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
        if self.observer:
            self.observer.batch_ran(images_in(batch), seconds, batch[0].total_steps)

    def fail(self, batch: list[Job], error: ServiceError) -> None:
        """End every still-running job of ``batch`` as failed with ``error``."""
        with self._condition:
            for job in batch:
                if job.status is JobStatus.running:
                    self.end(job, JobStatus.failed, error)

    # --- for the encoder -------------------------------------------------------------------------------

    def succeed(self, job: Job, images: list[StoredImage], seconds: float) -> bool:
        """Give a job its stored images and mark it succeeded; False when it was cancelled or timed out meanwhile."""
        with self._condition:
            if job.status is not JobStatus.running:
                return False
            job.images, job.generation_seconds, job.step = images, seconds, job.total_steps
            self.end(job, JobStatus.succeeded)
            return True

    # --- shared ----------------------------------------------------------------------------------------

    def end(self, job: Job, status: JobStatus, error: ServiceError | None = None) -> None:
        """Move ``job`` to a terminal state (failed: with the error's message and status) and announce it."""
        with self._condition:
            job.status, job.finished_at = status, utc_now()
            job.error, job.error_status = (error.message, error.status_code) if error else (None, None)
            if job in self._running:
                self._running.remove(job)
            self.store.save(job)
            self._condition.notify_all()  # the loader may now have room for the next model
        if self.observer:
            self.observer.job_finished(status.value)
        self.events.emit(job, status.value)

    def past_deadline(self, job: Job) -> bool:
        """True once SD_JOB_TIMEOUT_S has passed since the job was submitted."""
        return time.time() > job.created_at.timestamp() + self.settings.job_timeout_s

    def timeout_error(self) -> JobTimeoutError:
        """What a job past SD_JOB_TIMEOUT_S fails with."""
        return JobTimeoutError(f"the job did not finish within {self.settings.job_timeout_s:g} s (SD_JOB_TIMEOUT_S)")

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth."""
        batches_ahead = len(self._queue) / self.max_batch_size
        return max(1, math.ceil(batches_ahead * self._seconds_per_batch))
