"""The worker threads: the one device thread that runs batches, the loader that brings queued jobs' models in
meanwhile, and the encoders that turn images into stored PNGs. No exception ends a loop: a failure fails the jobs
it touched, is logged with their request ids and reported in the liveness, and the loop goes on."""

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from config import Settings
from sd_server.domain.generation import Generation, sampler_label
from sd_server.domain.jobs import Job, JobStatus, StoredImage
from sd_server.domain.models import DEFAULT_USER
from sd_server.engine.interface import BatchKey, BatchOutput, Engine
from sd_server.engine.png import a1111_parameters
from sd_server.errors import DeviceLostError, GenerationFailedError, ModelLoadError, ServiceError, StorageError, summary
from sd_server.jobs.batching import batch_items, batch_key
from sd_server.jobs.dispatch import Dispatcher
from sd_server.jobs.trainings import Trainings
from sd_server.observability.liveness import Liveness, PartState, Readiness
from sd_server.provenance.marks import ImageFacts, Provenance, fingerprint
from sd_server.registry import ModelRegistry
from sd_server.storage.images import ImageStorage, image_name

logger = logging.getLogger(__name__)
BACKOFF_S = (0.1, 5.0)  # first and longest pause of a loop after an unexpected failure


class Workers:
    """Starts and stops the device thread, the loader thread and the encoder pool of one queue, and registers
    each with the liveness."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        engine: Engine,
        registry: ModelRegistry,
        storage: ImageStorage,
        trainings: Trainings,
        liveness: Liveness,
        on_device_lost: Callable[[], None],
        provenance: Provenance,
    ) -> None:
        self.dispatcher, self.engine, self.liveness = dispatcher, engine, liveness
        self.encoder = Encoder(settings, dispatcher, engine, storage, liveness, provenance)
        self.devices = [  # several when the engine runs batches elsewhere (Ray replicas); only the first trains
            threading.Thread(
                target=DeviceWorker(
                    dispatcher, engine, registry, self.encoder, trainings if index == 0 else None, liveness, on_device_lost
                ).run,
                name=f"sd-device-{index}" if index else "sd-device",
                daemon=True,
            )
            for index in range(engine.parallel_batches)
        ]
        loader = Loader(settings, dispatcher, engine, registry, dispatcher.readiness, liveness)
        self.loader = threading.Thread(target=loader.run, name="sd-loader", daemon=True)
        self.liveness.register("device", alive=lambda: all(self._alive(thread)() for thread in self.devices), critical=True)
        self.liveness.register("loader", alive=self._alive(self.loader))
        self.liveness.register("encoder")

    def _alive(self, thread: threading.Thread) -> Callable[[], bool]:
        """A thread is alive once started and until it returns; before start (or after stop) it counts as alive."""
        return lambda: thread.is_alive() or thread.ident is None or self.dispatcher.queue.stopping

    def start(self) -> None:
        """Start the threads."""
        for thread in self.devices:
            thread.start()
        self.loader.start()

    async def stop(self, timeout_s: float) -> bool:
        """After ``Dispatcher.close()``: let the running batch (or training slice) finish, up to ``timeout_s``, and its
        images be stored; a batch cut off by the timeout runs again after the restart. True when the device stopped."""
        deadline = time.monotonic() + timeout_s
        for thread in self.devices:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.devices):
            logger.warning("the running batch did not finish within SD_SHUTDOWN_TIMEOUT_S; it runs again after restart")
            return False
        await asyncio.to_thread(self.encoder.shutdown)
        return True


def run_guarded(part: str, liveness: Liveness, iteration: Callable[[], bool]) -> None:
    """Call ``iteration`` until it returns False; an exception it raises is logged and reported, and after a pause
    that grows with repeated failures the loop goes on."""
    pause = BACKOFF_S[0]
    while True:
        try:
            if not iteration():
                return
            pause = BACKOFF_S[0]
        except Exception as error:
            logger.exception("the %s loop failed; it goes on", part)
            liveness.set(part, PartState.failing, summary(error))
            time.sleep(pause)
            pause = min(pause * 2, BACKOFF_S[1])


class Loader:
    """Loads the default model (readiness), then brings the models of queued jobs onto the device in queue order,
    while the device runs other batches."""

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, engine: Engine, registry: ModelRegistry, readiness: Readiness, liveness: Liveness
    ) -> None:
        self.settings, self.dispatcher, self.engine, self.registry = settings, dispatcher, engine, registry
        self.readiness, self.liveness = readiness, liveness

    def run(self) -> None:
        """The loader thread's loop, until the queue closes."""
        if self.settings.preload_default_model:
            self.preload_default()
        run_guarded("loader", self.liveness, self.load_next)

    def load_next(self) -> bool:
        """Load the next model a queued job needs; False once the queue closes."""
        target = self.dispatcher.next_model_to_load()
        if target is None:
            return False
        model, keep = target.model, target.keep
        try:
            loaded = self.engine.prepare(model, keep)
        except Exception as error:  # a load failure fails the jobs that need that model, and nothing else
            failure = error if isinstance(error, ServiceError) else ModelLoadError(f"could not load model '{model.label}'")
            log_failure(f"loading model {model.label}", failure, error)
            self.dispatcher.fail_queued(lambda job: job.model == model, failure)
            return True
        self.liveness.set("loader", PartState.ok)
        self.dispatcher.model_prepared(loaded)
        return True

    def preload_default(self) -> None:
        """Bring the default user's model onto the device; readiness follows it."""
        try:
            if not self.engine.prepare(self.registry.get(DEFAULT_USER)):
                raise ModelLoadError("no room on the device for the default model (SD_CACHE_DEVICE_GB)")
            self.readiness.set_ready()
        except Exception as error:  # the service stays up, not ready; jobs report the error themselves
            self.readiness.set_not_ready(error.message if isinstance(error, ServiceError) else repr(error))


class DeviceWorker:
    """The one thread that owns the device: takes a batch whose model is ready, runs it, hands its images on; between
    batches, runs a slice of the training in progress."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        engine: Engine,
        registry: ModelRegistry,
        encoder: "Encoder",
        trainings: Trainings | None,
        liveness: Liveness,
        on_device_lost: Callable[[], None],
    ) -> None:
        self.dispatcher, self.engine, self.registry, self.encoder = dispatcher, engine, registry, encoder
        self.trainings, self.liveness, self.on_device_lost = trainings, liveness, on_device_lost

    def run(self) -> None:
        """The device thread's loop, until the queue closes or the device is lost."""
        run_guarded("device", self.liveness, self.run_next)

    def run_next(self) -> bool:
        """Run the next batch, or else a training slice; False when the queue closes or the device is lost."""
        batch = self.dispatcher.next_batch(self.trainings.has_work if self.trainings else lambda: False)
        if batch is None:
            return False
        self.liveness.set("device", PartState.busy)
        if not batch and self.trainings:
            started = time.monotonic()
            self.trainings.run_slice()
            self.dispatcher.record_training(time.monotonic() - started)
            self.liveness.set("device", PartState.ok)
            return True
        try:
            return self.run_batch(batch, batch_key(batch[0]))
        except Exception as error:  # a failure of the queue's own bookkeeping: the batch fails, the loop goes on
            failure = GenerationFailedError(f"the batch failed; {log_reference(batch[0])}")
            log_failure(f"batch of {len(batch)} jobs", failure, error, batch)
            self.liveness.set("device", PartState.failing, summary(error))
            self.dispatcher.fail(batch, failure)
            return True

    def run_batch(self, batch: list[Job], key: BatchKey) -> bool:
        """Run one batch; when a batch of several fails, run its jobs one by one (after the failure is let go, so
        its memory is free). False when the device is lost."""
        failure = self.generate(batch, key)
        if isinstance(failure, DeviceLostError):
            self.device_lost(batch, failure)
            return False
        if failure is None:
            self.liveness.set("device", PartState.ok)
            return True
        if len(batch) > 1 and not isinstance(failure, ModelLoadError):  # alone, each may fit (out of memory, say)
            logger.warning("a batch of %d jobs failed (%s); running them one by one", len(batch), failure)
            self.engine.free_memory()
            for job in batch:
                if job.status is JobStatus.running:
                    job.batch_size = job.images_requested
                    if not self.run_batch([job], key):
                        return False
            return True
        reported = failure if isinstance(failure, ServiceError) else GenerationFailedError(
            f"generation with model '{batch[0].model.label}' failed; {log_reference(batch[0])}"
        )
        log_failure(f"batch of {len(batch)} jobs on {key.base}", reported, failure, batch)
        self.liveness.set("device", PartState.failing, reported.message)
        self.dispatcher.fail(batch, reported)
        return True

    def generate(self, batch: list[Job], key: BatchKey) -> Exception | None:
        """Run the batch on the engine and hand its images to the encoder; the exception it failed with, if any."""
        started = time.monotonic()
        try:
            output = self.engine.run_batch(
                key,
                batch_items(batch),
                lambda step, total, previews=None: self.dispatcher.progress(batch, step, total, previews),
                lambda: self.dispatcher.should_stop(batch),
            )
        except Exception as error:
            return error
        if output is None:  # every job of the batch was cancelled or timed out, or asked to finish early
            self.dispatcher.end_unfinished(batch)
        else:
            self.finished(batch, output, time.monotonic() - started)
        return None

    def finished(self, batch: list[Job], output: BatchOutput, seconds: float) -> None:
        """Count the batch, and encode and store its images on the encoder's threads."""
        self.dispatcher.record_batch(batch, seconds)
        if any(job.model == self.registry.get(DEFAULT_USER) for job in batch):
            self.dispatcher.readiness.set_ready()
        for job, images in zip(batch, output.images):
            self.encoder.submit(job, images, output.scheduler, seconds)

    def device_lost(self, batch: list[Job], error: DeviceLostError) -> None:
        """The device cannot be trusted in this process any more: report it defunct, give the batch back to the
        queue (stored as queued, it runs after the restart), and ask for the process to stop."""
        log_failure(f"batch of {len(batch)} jobs", error, error, batch)
        self.liveness.set("device", PartState.dead, error.message)
        self.dispatcher.give_back(batch, error)
        self.on_device_lost()


class Encoder:
    """Encodes, marks (provenance) and stores each job's images on threads of its own, so the device runs the next
    batch meanwhile."""

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, engine: Engine, storage: ImageStorage, liveness: Liveness, provenance: Provenance
    ) -> None:
        self.settings, self.dispatcher, self.engine, self.storage, self.liveness = settings, dispatcher, engine, storage, liveness
        self.provenance = provenance
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sd-encode")

    def submit(self, job: Job, images: list[Any], scheduler: str, seconds: float) -> None:
        """Finish ``job`` with ``images`` in the background."""
        self._pool.submit(self.finish_guarded, job, images, scheduler, seconds)

    def shutdown(self) -> None:
        """Wait for the images being encoded."""
        self._pool.shutdown(wait=True)

    def finish_guarded(self, job: Job, images: list[Any], scheduler: str, seconds: float) -> None:
        """``finish``, failing the job (and reporting the encoder failing) on any unexpected error."""
        try:
            self.finish(job, images, scheduler, seconds)
        except Exception as error:
            failure = GenerationFailedError(f"encoding the images failed; {log_reference(job)}")
            log_failure(f"encoding job {job.id}", failure, error, [job])
            self.liveness.set("encoder", PartState.failing, summary(error))
            self.dispatcher.fail([job], failure)

    def finish(self, job: Job, images: list[Any], scheduler: str, seconds: float) -> None:
        """Encode, mark and store the images, then mark the job succeeded: never succeeded without its images, and no
        image left behind by a job that ended otherwise meanwhile."""
        job.scheduler_used = scheduler
        texts = [png_parameters(job, scheduler, index) for index in range(len(images))]
        facts = [image_facts(job, index, text) for index, text in enumerate(texts)]
        marked = [self.provenance.watermark(image, fact) for image, fact in zip(images, facts)]
        pngs = [self.provenance.seal(png, fact) for png, fact in zip(self.engine.encode(marked, texts), facts)]
        self.liveness.set("encoder", PartState.ok)  # before the job is announced, so its client sees it
        store = self.settings.save_images or not job.synchronous
        stored = []
        for index, png in enumerate(pngs):
            key = image_name(job.seed + index) if store else None
            stored.append(StoredImage(job.seed + index, key, len(png), hashlib.sha256(png).hexdigest(), png))
        written: list[str] = []
        try:
            for image in stored:
                if image.key:
                    self.storage.put(image.key, image.png)
                    written.append(image.key)
        except StorageError as error:
            self.remove(written)
            log_failure(f"storing the images of job {job.id}", error, error, [job])
            self.dispatcher.fail([job], error)
            return
        if not job.synchronous:
            for image in stored:
                image.png = b""  # stored; nobody waits for the bytes
        if not self.dispatcher.succeed(job, stored, seconds):
            self.remove(written)

    def remove(self, keys: list[str]) -> None:
        """Delete stored images that no job will point at."""
        for key in keys:
            self.storage.delete(key)


def image_facts(job: Job, index: int, parameters: str) -> ImageFacts:
    """What the provenance marks of the job's image ``index`` say."""
    fingerprint = watermark_fingerprint(job, job.scheduler_used or "", index)
    return ImageFacts(job.id, index, job.model_id, parameters, fingerprint, job.inputs.get("mask"), job.inputs.get("credentials"))


def watermark_fingerprint(job: Job, scheduler: str, index: int) -> str:
    """The fingerprint the watermark of the job's image ``index`` carries: of its parameters without the model's name
    (the same weights under two names, a LoRA uploaded and the same file named, draw the same pixels)."""
    return fingerprint(png_parameters(job, scheduler, index, model_id=""))


def png_parameters(job: Job, scheduler: str, index: int, model_id: str | None = None) -> str:
    """The A1111 ``parameters`` text of the job's image ``index`` (seed + index), naming ``model_id`` (None: the
    job's model)."""
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
        job.model_id if model_id is None else model_id,
        image_parameters(request),
    )


def image_parameters(request: Generation) -> dict[str, object]:
    """What an img2img, inpainting or hires fix image's parameters add, in A1111's words (nothing for plain txt2img)."""
    image_input, hires = request.image_input, request.hires
    if hires is not None:
        return {
            "Denoising strength": hires.strength,
            "Hires resize": f"{hires.width}x{hires.height}",
            "Hires steps": hires.steps,
            "Hires upscaler": hires.upscaler,
        }
    if image_input is None:
        return {}
    extras: dict[str, object] = {"Mode": request.mode.value, "Denoising strength": image_input.strength}
    if image_input.mask_sha256:
        extras["Mask blur"] = image_input.mask_blur
        if image_input.inpaint_full_res:
            extras.update({"Inpaint area": "Only masked", "Masked area padding": image_input.inpaint_full_res_padding})
    return extras


def log_reference(job: Job) -> str:
    """Where a client finds the details of a failure: the server log, under the request id."""
    return f"the server log has the details (request id {job.request_id or job.id})"


def log_failure(what: str, failure: ServiceError, cause: BaseException, jobs: Sequence[Job] = ()) -> None:
    """Log a failure with its internal detail and the request ids of the jobs it touched."""
    request_ids = ",".join(sorted({job.request_id or job.id for job in jobs})) or "-"
    detail = f" ({failure.detail})" if failure.detail else ""
    logger.error("%s failed: %s%s", what, failure.message, detail, exc_info=cause, extra={"request_id": request_ids})
