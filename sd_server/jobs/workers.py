"""The worker threads: the one device thread that runs batches, the loader that brings queued jobs' models in
meanwhile, and the encoders that turn images into stored PNGs."""

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sd_server.domain.generation import sampler_label
from sd_server.domain.jobs import Job, JobStatus, StoredImage
from sd_server.domain.models import DEFAULT_USER
from sd_server.engine.interface import BatchKey, Engine
from sd_server.engine.png import a1111_parameters
from sd_server.errors import (
    GenerationFailedError,
    ModelLoadError,
    ServiceError,
    StorageError,
)
from sd_server.jobs.batching import batch_items, batch_key
from sd_server.jobs.queue import JobQueue
from sd_server.storage.images import image_name

logger = logging.getLogger(__name__)


class Workers:
    """Starts and stops the device thread, the loader thread and the encoder pool of one queue."""

    def __init__(self, queue: JobQueue, engine: Engine) -> None:
        self.queue, self.engine = queue, engine
        self.encoder = Encoder(queue, engine)
        self.device = threading.Thread(target=DeviceWorker(queue, engine, self.encoder).run, name="sd-device", daemon=True)
        self.loader = threading.Thread(target=Loader(queue, engine).run, name="sd-loader", daemon=True)

    def start(self) -> None:
        """Start the threads."""
        self.device.start()
        self.loader.start()

    async def stop(self, timeout_s: float) -> None:
        """After ``queue.close()``: let the running batch finish (up to ``timeout_s``) and its images be stored; a
        batch cut off by the timeout runs again after the restart."""
        await asyncio.to_thread(self.device.join, timeout_s)
        if self.device.is_alive():
            logger.warning("the running batch did not finish within SD_SHUTDOWN_TIMEOUT_S; it runs again after restart")
            return
        await asyncio.to_thread(self.encoder.shutdown)


class Loader:
    """Loads the default model (readiness), then brings the models of queued jobs onto the device in queue order,
    while the device runs other batches."""

    def __init__(self, queue: JobQueue, engine: Engine) -> None:
        self.queue, self.engine = queue, engine

    def run(self) -> None:
        """The loader thread's loop, until the queue closes."""
        if self.queue.settings.preload_default_model:
            self.preload_default()
        while (target := self.queue.next_model_to_load()) is not None:
            model, keep = target
            try:
                loaded = self.engine.prepare(model, keep)
            except Exception as error:  # a load failure fails the jobs that need that model, and nothing else
                failure = error if isinstance(error, ServiceError) else ModelLoadError(f"could not load model '{model.label}'")
                log_failure(f"loading model {model.label}", failure, error)
                self.queue.fail_queued(lambda job: job.model == model, failure)
                continue
            self.queue.model_prepared(loaded)

    def preload_default(self) -> None:
        """Bring the default user's model onto the device; readiness follows it."""
        try:
            if not self.engine.prepare(self.queue.registry.get(DEFAULT_USER)):
                raise ModelLoadError("no room on the device for the default model (SD_CACHE_DEVICE_GB)")
            self.queue.ready = True
        except Exception as error:  # the service stays up, not ready; jobs report the error themselves
            self.queue.not_ready_reason = error.message if isinstance(error, ServiceError) else repr(error)


class DeviceWorker:
    """The one thread that owns the device: takes a batch whose model is ready, runs it, hands its images on."""

    def __init__(self, queue: JobQueue, engine: Engine, encoder: "Encoder") -> None:
        self.queue, self.engine, self.encoder = queue, engine, encoder

    def run(self) -> None:
        """The device thread's loop, until the queue closes."""
        while (batch := self.queue.next_batch()) is not None:
            self.run_batch(batch, batch_key(batch[0]))

    def run_batch(self, batch: list[Job], key: BatchKey) -> None:
        """Run one batch; on failure of a batch of several, run its jobs one by one."""
        started = time.monotonic()
        try:
            output = self.engine.run_batch(
                key, batch_items(batch), lambda step, total: self.queue.progress(batch, step, total), lambda: self.queue.all_ended(batch)
            )
        except ServiceError as error:
            log_failure(f"batch of {len(batch)} jobs on {key.model.label}", error, error, batch)
            self.queue.fail(batch, error)
            return
        except Exception as error:
            if len(batch) > 1:
                logger.warning("a batch of %d jobs failed (%s); running them one by one", len(batch), error)
                self.engine.free_memory()
                for job in batch:
                    if job.status is JobStatus.running:
                        job.batch_size = job.images_requested
                        self.run_batch([job], key)
                return
            failure = GenerationFailedError(f"generation with model '{key.model.label}' failed; {log_reference(batch[0])}")
            log_failure(f"job {batch[0].id}", failure, error, batch)
            self.queue.fail(batch, failure)
            return
        if output is None:  # every job of the batch was cancelled or timed out
            return
        seconds = time.monotonic() - started
        self.queue.record_batch(batch, seconds)
        if key.model == self.queue.registry.get(DEFAULT_USER):
            self.queue.ready = True
        for job, images in zip(batch, output.images):
            self.encoder.submit(job, images, output.scheduler, seconds)


class Encoder:
    """Encodes and stores each job's images on threads of its own, so the device runs the next batch meanwhile."""

    def __init__(self, queue: JobQueue, engine: Engine) -> None:
        self.queue, self.engine = queue, engine
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sd-encode")

    def submit(self, job: Job, images: list[Any], scheduler: str, seconds: float) -> None:
        """Finish ``job`` with ``images`` in the background."""
        self._pool.submit(self.finish, job, images, scheduler, seconds)

    def shutdown(self) -> None:
        """Wait for the images being encoded."""
        self._pool.shutdown(wait=True)

    def finish(self, job: Job, images: list[Any], scheduler: str, seconds: float) -> None:
        """Encode and store the images, then mark the job succeeded: never succeeded without its images."""
        job.scheduler_used = scheduler
        pngs = self.engine.encode(images, [png_parameters(job, scheduler, index) for index in range(len(images))])
        store = self.queue.settings.save_images or not job.synchronous
        stored = []
        for index, png in enumerate(pngs):
            key = image_name(job.seed + index) if store else None
            stored.append(StoredImage(job.seed + index, key, len(png), hashlib.sha256(png).hexdigest(), png))
        try:
            for image in stored:
                if image.key:
                    self.queue.storage.put(image.key, image.png)
        except StorageError as error:
            log_failure(f"storing the images of job {job.id}", error, error, [job])
            self.queue.fail([job], error)
            return
        if self.queue.succeed(job, stored, seconds) and not job.synchronous:
            job.take_pngs()  # stored; nobody waits for the bytes


def png_parameters(job: Job, scheduler: str, index: int) -> str:
    """The A1111 ``parameters`` text of the job's image ``index`` (seed + index)."""
    request = job.request
    return a1111_parameters(
        request.prompt,
        request.negative_prompt,
        request.num_inference_steps,
        sampler_label(scheduler),
        request.guidance_scale,
        job.seed + index,
        request.width,
        request.height,
        job.model_id,
    )


def log_reference(job: Job) -> str:
    """Where a client finds the details of a failure: the server log, under the request id."""
    return f"the server log has the details (request id {job.request_id or job.id})"


def log_failure(what: str, failure: ServiceError, cause: BaseException, jobs: Sequence[Job] = ()) -> None:
    """Log a failure with its internal detail and the request ids of the jobs it touched."""
    request_ids = ",".join(sorted({job.request_id or job.id for job in jobs})) or "-"
    detail = f" ({failure.detail})" if failure.detail else ""
    logger.error("%s failed: %s%s", what, failure.message, detail, exc_info=cause, extra={"request_id": request_ids})
