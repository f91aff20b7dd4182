"""The job queue: a bounded FIFO of jobs and the jobs running now, guarded by one condition that is never held
during I/O. Requests submit and cancel here; the worker threads (``workers``) take batches and models to load from
here and end jobs here. State changes happen in memory under the condition; each is then written to the database
by the thread that made it, outside the condition (``writer``), so /health and job positions never wait on it."""

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

from config import Settings
from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, JobStatus, JobStore, StoredImage, utc_now
from sd_server.domain.models import UserModel
from sd_server.engine.interface import Engine
from sd_server.errors import (
    JobFinishedError,
    JobTimeoutError,
    ServiceError,
    ServiceUnavailableError,
)
from sd_server.jobs import admission
from sd_server.jobs.batching import BatchRules, companions, images_in
from sd_server.jobs.events import JobEvents
from sd_server.jobs.writer import JobWriter
from sd_server.observability.liveness import Liveness
from sd_server.registry import ModelRegistry
from sd_server.storage.images import ImageStorage

logger = logging.getLogger(__name__)


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
        liveness: Liveness | None = None,
    ) -> None:
        self.settings, self.engine, self.registry, self.store, self.storage = settings, engine, registry, store, storage
        self.events = events or JobEvents()
        self.liveness = liveness or Liveness()
        self.writer = JobWriter(store, self.events, self.liveness)
        self.max_batch_size = settings.max_batch_size or engine.default_max_batch_size
        self.batch_rules = BatchRules(self.max_batch_size, settings.max_adapters, settings.batch_across_adapters)
        self.batches_run = 0
        self.mixed_batches_run = 0  # batches whose jobs ran on more than one model (different LoRAs on one base)
        self.images_run = 0
        self.ready = False
        self.not_ready_reason = "the default model is loading"
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._admitting: list[Job] = []  # admitted, being inserted into the database
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
        inputs: dict[str, bytes] | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job for ``request`` (with its init image and mask PNGs as ``inputs``, stored beside its images);
        returns it and whether it is new (False: an idempotent repeat).

        A synchronous job keeps its PNGs for the request that waits on it, and stores them if SD_SAVE_IMAGES;
        an asynchronous one always stores them (its result links to them) and keeps no copy in memory.
        """
        model = self.registry.get(request.user_id)
        job = admission.new_job(self.settings, request, model, synchronous, webhook_url, idempotency_key, request_id)
        if job.idempotency_key and (existing := self.store.find_by_idempotency_key(job.idempotency_key)):
            admission.check_repeat(job.fingerprint, existing, idempotency_key or "")
            return existing, False
        job.inputs = dict(inputs or {})
        job.prompt_chunks = self._prompt_chunks(job)
        with self._condition:
            active = sum(1 for other in self._queue + self._running + self._admitting if other.user_id == request.user_id)
            queued = len(self._queue) + len(self._admitting)
            admission.check_capacity(self.settings, request.user_id, active, queued, self._retry_after_s())
            self._admitting.append(job)
        stored = None
        try:
            self._store_inputs(job)
            stored = self.store.add(job)  # a racing retry of the same key finds its original here
        finally:
            with self._condition:
                self._admitting.remove(job)
            if stored is not job:
                self._delete_inputs(job)
        if stored is not job:
            admission.check_repeat(job.fingerprint, stored, idempotency_key or "")
            return stored, False
        with self._condition:
            self._queue.append(job)
            self._condition.notify_all()
        self.events.emit(job, "queued")
        return job, True

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a queued one leaves the queue now, a running one stops at its next step."""
        with self._condition:
            if job.status is JobStatus.queued and job in self._queue:
                self._queue.remove(job)
                self._mark_ended(job, JobStatus.cancelled)
                ended = [job]
            elif not job.status.is_terminal:
                job.cancel_requested, ended = True, []
            else:
                raise JobFinishedError(f"job {job.id} has already {job.status.value}")
        self.writer.announce(ended)

    def delete(self, job: Job) -> None:
        """Cancel the job if it is active, then delete its images and its record. Images a finishing job stores
        after this are deleted by the encoder (``succeed`` refuses a deleted job)."""
        with self._condition:
            job.deleted = True
            images = list(job.images)
        if not job.status.is_terminal:
            try:
                self.cancel(job)
            except JobFinishedError:
                images = list(job.images)  # it succeeded meanwhile: its images are listed now
        for image in images:
            if image.key:
                self.storage.delete(image.key)
        self._delete_inputs(job)
        self.store.delete(job.id)

    @property
    def stopping(self) -> bool:
        """True once the queue is closed."""
        return self._stopping

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 after it, ...; None once the job is no longer queued."""
        with self._condition:
            return self._queue.index(job) + 1 if job in self._queue else None

    def active_jobs(self, user_id: str) -> list[Job]:
        """The user's running jobs, then their queued ones in queue order."""
        with self._condition:
            return [job for job in self._running + self._queue if job.user_id == user_id]

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
            "mixed_batches_run": self.mixed_batches_run,
            "mean_batch_size": round(self.images_run / self.batches_run, 3) if self.batches_run else 0.0,
        }

    # --- start and stop ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Queue again what the last run left queued; a job that was running is re-queued once, then failed."""
        ended, requeued = [], []
        unfinished = self.store.unfinished()
        for job in unfinished:
            self._reload_inputs(job)
        with self._condition:
            for job in unfinished:
                if job.input_keys and not job.inputs:
                    self._mark_ended(job, JobStatus.failed, ServiceError("its init image or mask is gone from storage; submit it again"))
                    ended.append(job)
                    continue
                if job.status is JobStatus.running and job.attempts >= 1:
                    self._mark_ended(job, JobStatus.failed, ServiceError("the server stopped twice while this job ran; submit it again"))
                    ended.append(job)
                    continue
                if job.status is JobStatus.running:
                    job.attempts += 1
                    job.status, job.started_at, job.step = JobStatus.queued, None, 0
                    requeued.append(job)
                self._queue.append(job)
        self.writer.persist(requeued)
        self.writer.announce(ended)
        if self._queue:
            logger.info("re-queued %d unfinished jobs from the last run", len(self._queue))

    def close(self) -> None:
        """Stop handing out work: the workers finish what they hold and return."""
        with self._condition:
            self._stopping = True
            self.ready, self.not_ready_reason = False, "shutting down"
            self._condition.notify_all()

    def give_back(self, batch: list[Job], error: ServiceUnavailableError) -> None:
        """The device is gone with ``batch`` on it: its asynchronous jobs go back to the queue (stored as queued, they
        run after the restart, one attempt used), and every synchronous job, whose client waits, fails with ``error``."""
        with self._condition:
            self.ready, self.not_ready_reason = False, error.message
            requeued = []
            for job in batch:
                if job in self._running:
                    self._running.remove(job)
                    job.attempts += 1
                    job.status, job.started_at, job.step = JobStatus.queued, None, 0
                    self._queue.insert(0, job)
                    requeued.append(job)
            ended = [job for job in self._queue if job.synchronous]
            for job in ended:
                self._queue.remove(job)
                self._mark_ended(job, JobStatus.failed, error)
        self.writer.persist([job for job in requeued if not job.synchronous])
        self.writer.announce(ended)

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
            ended = [job for job in self._queue if matches(job)]
            for job in ended:
                self._queue.remove(job)
                self._mark_ended(job, JobStatus.failed, error)
        self.writer.announce(ended)

    # --- for the device worker -------------------------------------------------------------------------

    def next_batch(self, other_work: Callable[[], bool] = lambda: False) -> list[Job] | None:
        """Wait for the first queued job whose model is ready, then up to SD_BATCH_WAIT_MS for companions; take
        them off the queue as running. Jobs whose model is still loading wait without holding up the others. While
        idle, write what the database did not take before. An empty list, without waiting, when no batch is ready
        and ``other_work()`` says the device has something else to do (a training slice). None when stopping."""
        while not self._stopping:
            self.fail_queued(self.past_deadline, self.timeout_error())
            busy_elsewhere = other_work()
            batch = self._take_batch(wait_s=0.0 if busy_elsewhere else 1.0)
            if batch:
                self.writer.persist(batch)
                for job in batch:
                    self.events.emit(job, "started")
                return batch
            if busy_elsewhere:
                return []
            self.writer.flush()
        return None

    def wake(self) -> None:
        """Wake the device worker (new work that is not a job: a training)."""
        with self._condition:
            self._condition.notify_all()

    def _take_batch(self, wait_s: float) -> list[Job]:
        """The next batch, taken off the queue as running; empty after ``wait_s`` seconds of waiting for one."""
        with self._condition:
            first = next((job for job in self._queue if self.engine.is_ready(job.model)), None)
            if first is None:
                if wait_s:
                    self._condition.wait(timeout=wait_s)
                return []
            wait_until = time.monotonic() + self.settings.batch_wait_ms / 1000
            while images_in(companions(first, self._queue, self.batch_rules)) < self.max_batch_size and not self._stopping:
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(timeout=remaining)
            if first not in self._queue or self._stopping:
                return []  # the first job was cancelled while waiting: start over
            batch = companions(first, self._queue, self.batch_rules)
            for job in batch:
                self._queue.remove(job)
                job.status, job.started_at = JobStatus.running, utc_now()
                job.batch_size, job.step = images_in(batch), 0
            self._running.extend(batch)
            return batch

    def progress(self, batch: list[Job], step: int, total: int) -> None:
        """After a denoising step: end the batch's cancelled and timed-out jobs, report progress of the others."""
        ended = []
        with self._condition:
            for job in batch:
                if job.status is not JobStatus.running:
                    continue
                if job.cancel_requested:
                    self._mark_ended(job, JobStatus.cancelled)
                    ended.append(job)
                elif self.past_deadline(job):
                    self._mark_ended(job, JobStatus.failed, self.timeout_error())
                    ended.append(job)
                else:
                    job.step, job.total_steps = step, total
                    self.events.emit(job, "progress", {"job_id": job.id, "step": step, "total": total})
        self.writer.announce(ended)

    def all_ended(self, batch: list[Job]) -> bool:
        """True when no job of the batch is running any more (the pipeline call may stop)."""
        with self._condition:
            return all(job.status is not JobStatus.running for job in batch)

    def record_batch(self, batch: list[Job], seconds: float) -> None:
        """Count the batch, and keep a moving average of its time for Retry-After."""
        with self._condition:
            self.batches_run += 1
            self.mixed_batches_run += len({job.model for job in batch}) > 1
            self.images_run += images_in(batch)
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
        if self.writer.observer:
            self.writer.observer.batch_ran(images_in(batch), seconds, batch[0].total_steps)

    def fail(self, batch: Iterable[Job], error: ServiceError) -> None:
        """End every still-running job of ``batch`` as failed with ``error``."""
        with self._condition:
            ended = [job for job in batch if job.status is JobStatus.running]
            for job in ended:
                self._mark_ended(job, JobStatus.failed, error)
        self.writer.announce(ended)

    # --- for the encoder -------------------------------------------------------------------------------

    def succeed(self, job: Job, images: list[StoredImage], seconds: float) -> bool:
        """Give a job its stored images and mark it succeeded. False when it was cancelled, deleted or timed out
        meanwhile (the caller deletes the images it stored); a cancel that came too late for a step ends it now."""
        with self._condition:
            if job.status is not JobStatus.running or job.deleted:
                return False
            if job.cancel_requested:
                self._mark_ended(job, JobStatus.cancelled)
            else:
                job.images, job.generation_seconds, job.step = images, seconds, job.total_steps
                self._mark_ended(job, JobStatus.succeeded)
        self.writer.announce([job])
        return job.status is JobStatus.succeeded

    # --- shared ----------------------------------------------------------------------------------------

    def past_deadline(self, job: Job) -> bool:
        """True once SD_JOB_TIMEOUT_S has passed since the job was submitted."""
        return time.time() > job.created_at.timestamp() + self.settings.job_timeout_s

    def timeout_error(self) -> JobTimeoutError:
        """What a job past SD_JOB_TIMEOUT_S fails with."""
        return JobTimeoutError(f"the job did not finish within {self.settings.job_timeout_s:g} s (SD_JOB_TIMEOUT_S)")

    def _mark_ended(self, job: Job, status: JobStatus, error: ServiceError | None = None) -> None:
        """Move ``job`` to a terminal state in memory (failed: with the error's message and status). Call with the
        condition held; then ``writer.announce`` it without."""
        job.status, job.finished_at = status, utc_now()
        job.error, job.error_status = (error.message, error.status_code) if error else (None, None)
        job.inputs = {}  # stored; the device is done with them
        if job in self._running:
            self._running.remove(job)
        self._condition.notify_all()  # the loader may now have room for the next model

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

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth."""
        batches_ahead = len(self._queue) / self.max_batch_size
        return max(1, math.ceil(batches_ahead * self._seconds_per_batch))
