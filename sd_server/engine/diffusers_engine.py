"""The in-process engine: Stable Diffusion pipelines from diffusers, cached in two tiers, with LoRA adapters; the
job queue's device and loader threads call it."""

from collections.abc import Callable, Set
from dataclasses import replace
from pathlib import Path

import diffusers
import torch
import transformers
from PIL import Image

from config import Settings
from sd_server.domain.generation import Mode
from sd_server.domain.models import CheckpointModel, LoraModel, UserModel
from sd_server.domain.trainings import TrainingSettings
from sd_server.engine import devices, image_modes, threads
from sd_server.engine.adapters import AdapterCache
from sd_server.engine.cache import CachedCheckpoint, CheckpointCache
from sd_server.engine.compiled import PipelineCompiler
from sd_server.engine.hires import Passes, decode_latents, in_latent_space, upscale_latents, upscale_pictures
from sd_server.engine.interface import BatchItem, BatchKey, BatchOutput, EngineReport, ImageSource, StepCallback, Stop
from sd_server.engine.lora_training import LoraTrainer, start_training
from sd_server.engine.mixed_adapters import SampleAdapter
from sd_server.engine.pictures import to_pictures
from sd_server.engine.png import encode_png
from sd_server.engine.previews import LivePreviews, fit_projection
from sd_server.engine.prompts import PromptCounter, prompt_arguments
from sd_server.engine.samplers import fresh_scheduler
from sd_server.errors import DeviceLostError, DeviceOutOfMemoryError, GenerationFailedError, ModelLoadError, first_line
from sd_server.storage.source_images import png_bytes

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


class BatchStopped(Exception):
    """Raised from the step callback when the queue says to stop: the pipeline call ends there."""


def check_finite(latents: torch.Tensor, key: BatchKey) -> None:
    """GenerationFailedError when the denoised latents hold a NaN or an infinity: decoded, they would be a black
    image that nobody asked for (the queue then runs a batch's jobs one by one, so only the culprit fails)."""
    if not torch.isfinite(latents).all():
        raise GenerationFailedError(
            f"the model '{key.base}' produced no finite values for this image (NaN or infinity), which would decode to "
            "a black image; try other prompt weights, another LoRA scale, or another sampler"
        )


class DiffusersEngine:
    """Keeps checkpoints in a two-tier cache budgeted in bytes (device, then host RAM), loads identical components
    once, puts LoRA adapters on resident bases, and runs batches."""

    parallel_batches = 1  # one device, one batch at a time

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = devices.choose_device(settings.device, torch.cuda.is_available(), torch.backends.mps.is_available())
        self.dtype = devices.choose_dtype(settings.dtype, self.device)
        threads.confine(self.device == "cpu")
        self.default_max_batch_size = devices.default_max_batch_size(self.device)
        self.compiler = PipelineCompiler(settings, settings.max_batch_size or self.default_max_batch_size)
        # With SD_COMPILE a UNet gets its LoRA slots as it loads, so the device tier's budget counts them from the start.
        self.cache = CheckpointCache(settings, self.device, self.dtype, on_load=self.compiler.compiled)
        self.adapters = AdapterCache(settings, self.cache)
        # Compiled CPU kernels are guarded on the thread count, which on a CPU device only the device thread has at
        # full: there the UNet compiles on the device thread, before its model's first batch; elsewhere on the loader.
        self.compiles_on_device_thread = self.device == "cpu"
        self.prompt_counter = PromptCounter(settings.models_dir)

    # --- queries, from any thread --------------------------------------------------------------------

    def loaded_models(self) -> list[str]:
        """Checkpoints in memory (either tier), least recently used first."""
        with self.cache.lock:
            return list(self.cache.checkpoints)

    def is_ready(self, model: UserModel) -> bool:
        """True when a batch for ``model`` can start now: its checkpoint is on the device (a LoRA loads in ms), and
        with SD_COMPILE its UNet is compiled."""
        checkpoint = self.cache.get(model.base)
        if checkpoint is None or not checkpoint.ready:
            return False
        return self.compiles_on_device_thread or self.compiler.is_warm(checkpoint.pipeline)

    def prompt_chunks(self, base: str, texts: list[str]) -> int:
        """How many 75-token chunks the longest of ``texts`` takes with ``base``'s tokenizer."""
        return self.prompt_counter.chunks(base, texts)

    def needs_loading(self, model: UserModel) -> bool:
        """True when the loader has work for ``model``: its checkpoint is not ready, or its LoRA file could be read
        ahead."""
        if not self.is_ready(model):
            return True
        return isinstance(model, LoraModel) and self.adapters.can_read_ahead(model)

    def cache_report(self) -> dict:
        """Per tier: resident checkpoints, bytes, budget, hits, misses, evictions, load seconds; and the adapters."""
        return {**self.cache.report(), "adapters": self.adapters.report()}

    def report(self) -> EngineReport:
        """Device, dtype, models in memory, cache figures and device memory now."""
        return EngineReport(
            device=self.device,
            dtype=str(self.dtype).removeprefix("torch."),
            loaded_models=self.loaded_models(),
            cache=self.cache_report(),
            device_memory_bytes=devices.allocated_bytes(self.device),
            device_memory_peak_bytes=devices.peak_allocated_bytes(self.device),
            compile=self.compiler.report(),
        )

    # --- loading (loader thread; request threads for uploads and removals) ------------------------------

    @threads.side_work
    def prepare(self, model: UserModel, keep: Set[str] = frozenset()) -> bool:
        """Bring ``model``'s checkpoint onto the device (from host RAM, else from disk), moving least recently used
        checkpoints not in ``keep`` and not running down a tier; then load its LoRA (or read the file) ahead, and with
        SD_COMPILE compile its UNet. False: no room now."""
        with self.cache.residency:
            checkpoint = self.cache.bring_to_device(model.base, keep)
            if checkpoint is None:
                return False
            if isinstance(model, LoraModel):
                self.adapters.load_ahead(checkpoint, model)
        if not self.compiles_on_device_thread and not self.compiler.is_warm(checkpoint.pipeline):
            self._warm(model.base)
        return True

    @threads.side_work
    def unload(self, source: str | None = None) -> list[str]:
        """Drop one cached checkpoint (or all), with its adapters, and free their memory; returns the ones dropped."""
        with self.cache.residency:
            self.adapters.forget_staged()
            return self.cache.unload(source)

    def close(self) -> None:
        """Drop every cached checkpoint and free their memory."""
        self.unload()

    @threads.side_work
    def unload_adapter(self, model: LoraModel) -> bool:
        """Take ``model``'s LoRA off its base (after the running batch); True when it was loaded."""
        return self.adapters.unload(model)

    @threads.side_work
    def check_adapter(self, base: str, path: Path) -> None:
        """Load the LoRA file at ``path`` onto ``base`` and take it off again; InvalidAdapterError if it does not load."""
        checkpoint = self._pin(base)
        try:
            self.adapters.check(checkpoint, path)
        finally:
            self.cache.unpin(checkpoint)

    # --- running (device worker thread) -----------------------------------------------------------------

    @threads.device_work
    def run_batch(
        self, key: BatchKey, items: list[BatchItem], on_step: StepCallback, should_stop: Callable[[], Stop]
    ) -> BatchOutput | None:
        """One pipeline call on the key's base for all items, each image with its own item's adapter and scale: each
        item's images, and the scheduler. None when ``should_stop()`` answered ``discard`` after a step; ``finish``
        decodes the latents as the steps so far left them."""
        checkpoint = self._pin(key.base)
        try:
            adapters = {model: self._sample_adapter(checkpoint, model) for model in dict.fromkeys(item.model for item in items)}
            samples = [adapters[item.model] for item in items for _ in range(item.num_images)]
            with checkpoint.lock:
                self.compiler.warm(checkpoint.pipeline)  # compiled already, unless it compiles on this thread
                with self.adapters.applied(checkpoint, samples, self.compiler.compiled(checkpoint.pipeline)):
                    return self._generate(checkpoint, key, items, on_step, should_stop)
        except BatchStopped:
            return None
        finally:
            self.cache.unpin(checkpoint)

    @threads.device_work
    def start_training(self, base: str, photos: list[Path], settings: TrainingSettings) -> LoraTrainer:
        """A LoRA training on ``base``'s own copy of the components (the cached pipelines, which other users' batches
        run on, are never touched), its photos encoded."""
        return start_training(self.settings.models_dir, base, photos, settings, self.device, loading=self.cache.residency)

    def encode(self, images: list[Image.Image], texts: list[str]) -> list[bytes]:
        """PNG-encode each image with its text as the ``parameters`` chunk."""
        return [encode_png(image, text) for image, text in zip(images, texts)]

    def free_memory(self) -> None:
        """Collect garbage, and return cached blocks to the driver on CUDA."""
        devices.free_memory(self.device)

    def _pin(self, base: str) -> CachedCheckpoint:
        """The checkpoint ``base``, on the device and marked in use (so never moved); loaded first if need be."""
        for _ in range(2):
            if (checkpoint := self.cache.pin(base)) is not None:
                return checkpoint
            if not self.prepare(CheckpointModel(source=base)):
                break
        raise ModelLoadError(f"no room on the device for model '{base}' while others run; raise SD_CACHE_DEVICE_GB")

    def _warm(self, base: str) -> None:
        """Compile ``base``'s UNet, pinned so that it stays on the device meanwhile (its jobs wait: it is not ready)."""
        checkpoint = self.cache.pin(base)
        if checkpoint is None:
            return  # moved off the device meanwhile: the next prepare compiles it
        try:
            with checkpoint.lock:
                self.compiler.warm(checkpoint.pipeline)
        finally:
            self.cache.unpin(checkpoint)

    def _sample_adapter(self, checkpoint: CachedCheckpoint, model: UserModel) -> SampleAdapter:
        """The adapter ``model``'s images run with in ``checkpoint``: its LoRA (loaded first if need be), or none."""
        if isinstance(model, LoraModel):
            return SampleAdapter(self.adapters.ensure(checkpoint, model), model.scale)
        return SampleAdapter(None)

    def _hires_pass(
        self, checkpoint: CachedCheckpoint, key: BatchKey, texts: dict, generators: list, latents: torch.Tensor, passes: Passes, step_ended: Callable
    ) -> list[Image.Image]:
        """Hires fix's second pass: the first pass's latents upscaled (or decoded and upscaled as pictures), refined by
        img2img at hires fix's size; the first pass decoded as it is when the batch was asked to finish."""
        hires = key.hires
        assert hires is not None
        if passes.finishing:
            return decode_latents(checkpoint.pipeline, latents)
        pipeline = image_modes.mode_pipeline(checkpoint, Mode.img2img)
        pipeline.scheduler, _ = fresh_scheduler(checkpoint.scheduler_class, checkpoint.scheduler_config, key.scheduler)
        images: dict
        if image_modes.is_inpainting_model(checkpoint):  # its pipeline takes pictures and a mask, as its img2img does
            pictures = upscale_pictures(decode_latents(checkpoint.pipeline, latents), hires)
            second = replace(key, mode=Mode.img2img, width=hires.width, height=hires.height, strength=hires.strength, hires=None)
            images, _ = image_modes.image_arguments(checkpoint, second, [ImageSource(png_bytes(picture)) for picture in pictures])
        else:
            upscaled = upscale_latents(latents, hires) if in_latent_space(hires) else upscale_pictures(decode_latents(checkpoint.pipeline, latents), hires)
            images = {"image": upscaled, "strength": hires.strength}
        return to_pictures(
            pipeline(
                **texts,
                **images,
                num_inference_steps=hires.steps or key.num_inference_steps,
                guidance_scale=key.guidance_scale,
                generator=generators,
                callback_on_step_end=step_ended,
                output_type="pt",
            ).images
        )

    def _projection(self, checkpoint: CachedCheckpoint) -> torch.Tensor:
        """The checkpoint's latent-to-RGB map for previews, fitted on its VAE the first time (its lock is held), kept on
        the device: a copy from pageable host memory would wait for the device."""
        if "preview_projection" not in checkpoint.derived:
            vae = checkpoint.pipeline.vae
            checkpoint.derived["preview_projection"] = fit_projection(vae).to(vae.device)
        return checkpoint.derived["preview_projection"]

    def _generate(
        self,
        checkpoint: CachedCheckpoint,
        key: BatchKey,
        items: list[BatchItem],
        on_step: StepCallback,
        should_stop: Callable[[], Stop],
    ) -> BatchOutput:
        pipeline = image_modes.mode_pipeline(checkpoint, key.mode)
        pipeline.scheduler, scheduler = fresh_scheduler(checkpoint.scheduler_class, checkpoint.scheduler_config, key.scheduler)
        # One CPU generator per image: an image is the same alone or in any batch, on any device.
        generators = [torch.Generator("cpu").manual_seed(item.seed + i) for item in items for i in range(item.num_images)]
        images, prepared = image_modes.image_arguments(checkpoint, key, [item.source for item in items for _ in range(item.num_images)])

        passes = Passes(key.hires.steps_to_run(key.num_inference_steps) if key.hires else 0, key.width, key.height)
        previews = LivePreviews()

        def step_ended(pipe, index: int, timestep, tensors: dict) -> dict:
            step, every = index + 1, self.settings.preview_every
            if every and step % every == 0 and step < pipe.num_timesteps:
                previews.start(tensors["latents"], self._projection(checkpoint), passes.width, passes.height)
            on_step(passes.before + step, passes.before + pipe.num_timesteps + passes.later, previews.take())
            stop = should_stop()
            if stop == Stop.discard:
                raise BatchStopped()
            if index + 1 == pipe.num_timesteps or stop == Stop.finish:
                check_finite(tensors["latents"], key)  # one device sync a pass, before the VAE decodes
            if stop == Stop.finish:
                passes.finishing = pipe._interrupt = True  # diffusers skips the steps left, then decodes the latents as they are
            return tensors

        try:
            texts = prompt_arguments(
                pipeline,
                [item.prompt for item in items for _ in range(item.num_images)],
                [item.negative_prompt or "" for item in items for _ in range(item.num_images)],
                key.prompt_chunks,
            )
            output = pipeline(
                **texts,
                **images,
                num_inference_steps=key.num_inference_steps,
                guidance_scale=key.guidance_scale,
                generator=generators,
                callback_on_step_end=step_ended,
                output_type="latent" if key.hires else "pt",
            )
            if key.hires:
                passes.next_pass(pipeline.num_timesteps, key.hires)
                output.images = self._hires_pass(checkpoint, key, texts, generators, output.images, passes, step_ended)
            else:
                output.images = to_pictures(output.images)
        except torch.OutOfMemoryError:
            output = None  # memory is freed below, once the error (and the tensors its traceback holds) is gone
        except RuntimeError as error:
            if devices.is_device_lost(error, self.device):
                raise DeviceLostError(
                    f"the {self.device} device failed for good in this process; the server restarts, and the jobs it "
                    "held run again",
                    detail=first_line(error),
                ) from error
            raise
        if output is None:
            self.free_memory()
            raise DeviceOutOfMemoryError(
                f"{self.device} ran out of memory for {len(generators)} image(s) of {key.width}x{key.height}; "
                "ask for fewer or smaller images, or lower SD_MAX_BATCH_SIZE or SD_CACHE_DEVICE_GB"
            )
        finished = iter([preparation.finish(image) if preparation else image for image, preparation in zip(output.images, prepared)])
        return BatchOutput([[next(finished) for _ in range(item.num_images)] for item in items], scheduler)
