"""The job queue: one worker thread owns the device and runs queued jobs, batching those that can share a call."""

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Protocol

from PIL import Image

from config import DEFAULT_USER, Settings
from images import image_name
from jobs import Job, JobStore, StoredImage, utc_now
from model_registry import ModelRegistry
from model_service import BatchItem, BatchKey, DeviceOutOfMemoryError, ModelLoadError, ModelService
from quotas import QuotaExceededError
from schemas import MAX_SEED, GenerateRequest, JobStatus, UserModel
from storage import ImageStorage, StorageError

logger = logging.getLogger(__name__)

CPU_MAX_BATCH_SIZE = 4  # measured with benchmarks/bench_serving.py on 2 CPU cores; see README
CUDA_MAX_BATCH_SIZE = 8

Event = tuple[str, dict]  # (SSE event name, data)


class QueueFullError(RuntimeError):
    """SD_MAX_QUEUE jobs are waiting: answered with 429 and Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobTooLargeError(ValueError):
    """width x height x steps x images is past SD_MAX_PIXEL_STEPS: answered with 422."""


class QueueObserver(Protocol):
    """Told about batches and finished jobs (the Prometheus metrics)."""

    def batch_ran(self, images: int, seconds: float, steps: int) -> None: ...

    def job_finished(self, status: str) -> None: ...


class JobFinishedError(RuntimeError):
    """The job has already ended and cannot be cancelled: answered with 409."""


class IdempotencyConflictError(RuntimeError):
    """An Idempotency-Key was reused with another body: answered with 409."""


class BatchAborted(Exception):
    """Every job of the running batch was cancelled or timed out: the pipeline call stops."""


def batch_key(job: Job) -> BatchKey:
    """What a job must share with others to run in the same pipeline call."""
    request = job.request
    return BatchKey(
        job.model, request.width, request.height, request.num_inference_steps, request.guidance_scale, request.scheduler
    )


class JobQueue:
    """A bounded FIFO of jobs, served by the one thread that owns the device and by a loader thread that brings the
    models of queued jobs onto the device meanwhile; events go out on the event loop."""

    def __init__(
        self, settings: Settings, model_service: ModelService, registry: ModelRegistry, store: JobStore, storage: ImageStorage
    ) -> None:
        self.settings = settings
        self.model_service = model_service
        self.registry = registry
        self.store = store
        self.storage = storage
        default_batch = CUDA_MAX_BATCH_SIZE if model_service.device == "cuda" else CPU_MAX_BATCH_SIZE
        self.max_batch_size = settings.max_batch_size or default_batch
        self.batches_run = 0
        self.images_run = 0
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._seconds_per_batch = 1.0
        self._subscribers: dict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._terminal_listeners: list[Callable[[Job], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = threading.Thread(target=self._work, name="sd-device", daemon=True)
        self._loader = threading.Thread(target=self._load_ahead, name="sd-loader", daemon=True)
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sd-encode")
        self._retention: asyncio.Task | None = None
        self.observer: QueueObserver | None = None
        self.ready = False
        self.not_ready_reason = "the default model is loading"

    # --- event loop side -------------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue the jobs the last run left unfinished, start the device worker and retention; on the loop."""
        self._loop = asyncio.get_running_loop()
        self._recover()
        self._worker.start()
        self._loader.start()
        if self.settings.retention_days:
            self._retention = asyncio.create_task(self._apply_retention_periodically())

    async def stop(self) -> None:
        """Let the running batch finish (up to SD_SHUTDOWN_TIMEOUT_S) and its images be stored; queued jobs stay
        queued in the database, and a batch cut off by the timeout runs again after the restart."""
        with self._condition:
            self._stopping = True
            self.ready, self.not_ready_reason = False, "shutting down"
            self._condition.notify_all()
        if self._retention:
            self._retention.cancel()
        await asyncio.to_thread(self._worker.join, self.settings.shutdown_timeout_s)
        if self._worker.is_alive():
            logger.warning("the running batch did not finish within SD_SHUTDOWN_TIMEOUT_S; it runs again after restart")
            return
        await asyncio.to_thread(self._encoder.shutdown, wait=True)

    def _recover(self) -> None:
        """Queue again what was queued; a job that was running is re-queued once, then failed."""
        for job in self.store.unfinished():
            if job.status is JobStatus.running and job.attempts >= 1:
                with self._condition:
                    self._end(job, JobStatus.failed, "the server stopped twice while this job ran; submit it again", 500)
                continue
            if job.status is JobStatus.running:
                job.attempts += 1
                job.status, job.started_at, job.step = JobStatus.queued, None, 0
                self.store.save(job)
            self._queue.append(job)
        if self._queue:
            logger.info("re-queued %d unfinished jobs from the last run", len(self._queue))

    def on_terminal(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` on the event loop whenever a job ends."""
        self._terminal_listeners.append(listener)

    def submit(
        self,
        request: GenerateRequest,
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
        work = request.width * request.height * request.num_inference_steps * request.num_images
        if work > self.settings.max_pixel_steps:
            raise JobTooLargeError(
                f"width x height x num_inference_steps x num_images = {work} is over {self.settings.max_pixel_steps} "
                "(SD_MAX_PIXEL_STEPS); ask for fewer pixels, steps or images"
            )
        fingerprint = hashlib.sha256(f"{request.model_dump_json()}|{webhook_url}".encode()).hexdigest()
        scoped_key = f"{request.user_id}:{idempotency_key}" if idempotency_key else None
        seed = request.seed if request.seed is not None else random.randint(0, MAX_SEED - request.num_images + 1)
        job = Job(request, model.label, seed, synchronous, webhook_url, scoped_key, fingerprint, request_id, model=model)
        with self._condition:  # held from the idempotency lookup to the insert: a retry racing its original finds it
            if scoped_key and (existing := self.store.find_by_idempotency_key(scoped_key)):
                if existing.fingerprint != fingerprint:
                    raise IdempotencyConflictError(f"Idempotency-Key '{idempotency_key}' was used for another request body")
                return existing, False
            active = sum(1 for other in self._queue + self._running if other.request.user_id == request.user_id)
            if active >= self.settings.max_active_jobs_per_user:
                raise QuotaExceededError(
                    f"user '{request.user_id}' has {active} jobs queued or running (SD_MAX_ACTIVE_JOBS_PER_USER); "
                    "wait for one to finish",
                    self._retry_after_s(),
                )
            if len(self._queue) >= self.settings.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.settings.max_queue} jobs, SD_MAX_QUEUE); retry later", self._retry_after_s()
                )
            self._queue.append(job)
            self.store.add(job)
            self._condition.notify_all()
        self._emit(job, "queued")
        return job, True

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a queued one leaves the queue now, a running one stops at its next step."""
        with self._condition:
            if job.status is JobStatus.queued:
                self._queue.remove(job)
                self._end(job, JobStatus.cancelled)
            elif job.status is JobStatus.running:
                job.cancel_requested = True
            else:
                raise JobFinishedError(f"job {job.id} has already {job.status.value}")

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

    def subscribe(self, job: Job) -> asyncio.Queue[Event]:
        """A queue that receives the job's events from now on; unsubscribe when done."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[job.id].add(events)
        return events

    def unsubscribe(self, job: Job, events: asyncio.Queue[Event]) -> None:
        """Stop sending the job's events to ``events``."""
        self._subscribers[job.id].discard(events)
        if not self._subscribers[job.id]:
            del self._subscribers[job.id]

    def _publish(self, job: Job, event: Event) -> None:
        """Event loop: hand ``event`` to the job's subscribers; on a terminal one, wake waiters and listeners."""
        for events in self._subscribers.get(job.id, ()):
            events.put_nowait(event)
        if job.status.is_terminal and event[0] == job.status.value:
            job.finished.set()
            for listener in self._terminal_listeners:
                listener(job)

    async def _apply_retention_periodically(self) -> None:
        """Run the retention every SD_RETENTION_INTERVAL_S."""
        while True:
            await asyncio.to_thread(self.apply_retention)
            await asyncio.sleep(self.settings.retention_interval_s)

    def apply_retention(self) -> int:
        """Delete the jobs that ended over SD_RETENTION_DAYS ago, and their images; returns how many."""
        cutoff = utc_now() - timedelta(days=self.settings.retention_days or 0)
        old_jobs = self.store.finished_before(cutoff)
        for job in old_jobs:
            self.delete(job)
        if old_jobs:
            logger.info("retention: deleted %d jobs that ended before %s", len(old_jobs), cutoff.isoformat())
        return len(old_jobs)

    def delete(self, job: Job) -> None:
        """Cancel the job if it is active, then delete its images and its record."""
        if not job.status.is_terminal:
            with contextlib.suppress(JobFinishedError):
                self.cancel(job)
        for image in job.images:
            if image.key:
                self.storage.delete(image.key)
        self.store.delete(job.id)

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth."""
        batches_ahead = len(self._queue) / self.max_batch_size
        return max(1, math.ceil(batches_ahead * self._seconds_per_batch))

    # --- any thread --------------------------------------------------------------------------------

    def _emit(self, job: Job, name: str, data: dict | None = None) -> None:
        """Send an event to the job's subscribers, from any thread."""
        assert self._loop is not None, "JobQueue.start() was not called"
        self._loop.call_soon_threadsafe(self._publish, job, (name, data or {}))

    def _end(self, job: Job, status: JobStatus, error: str | None = None, error_status: int | None = None) -> None:
        """Move ``job`` to a terminal state and announce it. Call with the condition held."""
        job.status, job.error, job.error_status = status, error, error_status
        job.finished_at = utc_now()
        if job in self._running:
            self._running.remove(job)
        self.store.save(job)
        self._condition.notify_all()  # the loader may now have room for the next model
        if self.observer:
            self.observer.job_finished(status.value)
        self._emit(job, status.value)

    # --- loader thread -------------------------------------------------------------------------------

    def _load_ahead(self) -> None:
        """The loader: load the default model (readiness), then bring the models of queued jobs onto the device in
        queue order, while the device runs other batches."""
        if self.settings.preload_default_model:
            self._preload_default()
        while (target := self._next_to_load()) is not None:
            model, keep = target
            try:
                loaded = self.model_service.prepare(model, keep)
            except Exception as error:  # a load failure fails the jobs that need that model, and nothing else
                message = str(error) if isinstance(error, ModelLoadError) else repr(error)
                with self._condition:
                    self._fail_queued(lambda job: job.model == model, message, 503)
                continue
            with self._condition:
                if loaded:
                    self._condition.notify_all()
                else:  # no room until a running or queued-ahead job ends
                    self._condition.wait(timeout=1.0)

    def _preload_default(self) -> None:
        """Bring the default user's model onto the device; readiness follows it."""
        try:
            if not self.model_service.prepare(self.registry.get(DEFAULT_USER)):
                raise ModelLoadError("no room on the device for the default model (SD_CACHE_DEVICE_GB)")
            self.ready = True
        except Exception as error:  # the service stays up, not ready; jobs report the error themselves
            self.not_ready_reason = str(error)

    def _next_to_load(self) -> tuple[UserModel, set[str]] | None:
        """Wait for a queued job whose model is not ready: its model, and the checkpoints that must stay on the device
        (those of the running batch and of the jobs queued ahead of it). None when stopping."""
        with self._condition:
            while not self._stopping:
                keep = {job.model.base for job in self._running}
                for job in self._queue:
                    if self.model_service.needs_loading(job.model):
                        return job.model, keep
                    keep.add(job.model.base)
                self._condition.wait(timeout=1.0)
        return None

    # --- device worker thread ----------------------------------------------------------------------

    def _work(self) -> None:
        """The device worker: take a batch whose model is ready, run it, repeat until stopped."""
        while (batch := self._next_batch()) is not None:
            self._run(batch, key=batch_key(batch[0]))

    def _next_batch(self) -> list[Job] | None:
        """Wait for the first queued job whose model is ready, then up to SD_BATCH_WAIT_MS for companions; take
        them off the queue as running. Jobs whose model is still loading wait without holding up the others."""
        with self._condition:
            while True:
                self._fail_queued(self._past_deadline, self._timeout_message(), 504)
                if self._stopping:
                    return None
                first = next((job for job in self._queue if self.model_service.is_ready(job.model)), None)
                if first is None:
                    self._condition.wait(timeout=1.0)
                    continue
                wait_until = time.monotonic() + self.settings.batch_wait_ms / 1000
                while self._batchable_images(first) < self.max_batch_size and not self._stopping:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(timeout=remaining)
                if first in self._queue:
                    break  # else the first job was cancelled while waiting: start over
            batch = self._take_batch(first)
            for job in batch:
                job.status, job.started_at = JobStatus.running, utc_now()
                self.store.save(job)
            self._running.extend(batch)
        for job in batch:
            self._emit(job, "started")
        return batch

    def _companions(self, first: Job) -> list[Job]:
        """Queued jobs that can share ``first``'s pipeline call, in queue order, within SD_MAX_BATCH_SIZE images."""
        key, taken, images = batch_key(first), [first], first.request.num_images
        for job in self._queue:
            if job is not first and batch_key(job) == key and images + job.request.num_images <= self.max_batch_size:
                taken.append(job)
                images += job.request.num_images
        return taken

    def _batchable_images(self, first: Job) -> int:
        """Images a batch led by ``first`` would hold now."""
        return sum(job.request.num_images for job in self._companions(first))

    def _take_batch(self, first: Job) -> list[Job]:
        """Remove ``first`` and its companions from the queue."""
        batch = self._companions(first)
        for job in batch:
            self._queue.remove(job)
        return batch

    def _fail_queued(self, matches: Callable[[Job], bool], error: str, error_status: int) -> None:
        """Take the queued jobs that ``matches`` picks off the queue, failed. Call with the condition held."""
        for job in [job for job in self._queue if matches(job)]:
            self._queue.remove(job)
            self._end(job, JobStatus.failed, error, error_status)

    def _past_deadline(self, job: Job) -> bool:
        """True once SD_JOB_TIMEOUT_S has passed since the job was submitted."""
        return time.time() > job.created_at.timestamp() + self.settings.job_timeout_s

    def _timeout_message(self) -> str:
        return f"the job did not finish within {self.settings.job_timeout_s:g} s (SD_JOB_TIMEOUT_S)"

    def _run(self, batch: list[Job], key: BatchKey) -> None:
        """Run one batch; on failure of a batch of several, run its jobs one by one."""
        for job in batch:
            job.batch_size, job.step = sum(other.request.num_images for other in batch), 0
        items = [BatchItem(job.request.prompt, job.request.negative_prompt, job.seed, job.request.num_images) for job in batch]
        started = time.monotonic()
        try:
            images, scheduler = self.model_service.run_batch(key, items, self._step_callback(batch))
        except BatchAborted:
            return
        except ModelLoadError as error:
            self._fail(batch, str(error), 503)
            return
        except Exception as error:
            if len(batch) > 1:
                logger.warning("a batch of %d jobs failed (%s); running them one by one", len(batch), error)
                self.model_service.free_memory()
                for job in batch:
                    if job.status is JobStatus.running:
                        self._run([job], key)
                return
            logger.exception("job %s failed", batch[0].id)
            status = 503 if isinstance(error, DeviceOutOfMemoryError) else 500
            self._fail(batch, f"generation with model '{key.model.label}' failed: {type(error).__name__}: {error}", status)
            return
        seconds = time.monotonic() - started
        self._record_batch(batch, seconds)
        if key.model == self.registry.get(DEFAULT_USER):
            self.ready = True
        if self.observer:
            self.observer.batch_ran(sum(job.request.num_images for job in batch), seconds, batch[0].total_steps)
        for job, job_images in zip(batch, images):
            self._encoder.submit(self._finish, job, job_images, scheduler, seconds)

    def _step_callback(self, batch: list[Job]) -> Callable[[int, int], None]:
        """Called after each denoising step: ends cancelled and timed-out jobs, reports progress of the others."""

        def on_step(step: int, total: int) -> None:
            with self._condition:
                for job in batch:
                    if job.status is not JobStatus.running:
                        continue
                    if job.cancel_requested:
                        self._end(job, JobStatus.cancelled)
                    elif self._past_deadline(job):
                        self._end(job, JobStatus.failed, self._timeout_message(), 504)
                    else:
                        job.step, job.total_steps = step, total
                        self._emit(job, "progress", {"job_id": job.id, "step": step, "total": total})
                if all(job.status is not JobStatus.running for job in batch):
                    raise BatchAborted()

        return on_step

    def _record_batch(self, batch: list[Job], seconds: float) -> None:
        """Count the batch, and keep a moving average of its time for Retry-After."""
        with self._condition:
            self.batches_run += 1
            self.images_run += sum(job.request.num_images for job in batch)
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds

    def _fail(self, batch: list[Job], error: str, error_status: int) -> None:
        """End every still-running job of ``batch`` as failed."""
        with self._condition:
            for job in batch:
                if job.status is JobStatus.running:
                    self._end(job, JobStatus.failed, error, error_status)

    # --- encoder threads ---------------------------------------------------------------------------

    def _finish(self, job: Job, images: list[Image.Image], scheduler: str, seconds: float) -> None:
        """Encode and store the images, then mark the job succeeded: never succeeded without its images."""
        job.scheduler_used = scheduler
        pngs = self.model_service.encode(job.model_id, job.parameters, images)
        store = self.settings.save_images or not job.synchronous
        stored = []
        for index, png in enumerate(pngs):
            seed = job.seed + index
            key = image_name(seed) if store else None
            stored.append(StoredImage(seed, key, len(png), hashlib.sha256(png).hexdigest(), png))
        try:
            for image in stored:
                if image.key:
                    self.storage.put(image.key, image.png)
        except StorageError as error:
            self._fail([job], str(error), 500)
            return
        with self._condition:
            if job.status is not JobStatus.running:
                return  # cancelled or timed out while encoding
            job.images, job.generation_seconds, job.step = stored, seconds, job.total_steps
            if not job.synchronous:
                job.take_pngs()  # stored; nobody waits for the bytes
            self._end(job, JobStatus.succeeded)
