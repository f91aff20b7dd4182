"""Loads, caches and runs Stable Diffusion pipelines; the job queue's worker thread is their only caller."""

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from config import Settings
from images import a1111_parameters, encode_png
from schemas import GenerationParameters, SchedulerName

logger = logging.getLogger(__name__)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, the options that make it this sampler, and A1111's name for it."""

    scheduler_class: type[SchedulerMixin]
    options: dict
    label: str


SCHEDULERS: dict[SchedulerName, SchedulerSpec] = {
    SchedulerName.pndm: SchedulerSpec(PNDMScheduler, {}, "PNDM"),
    SchedulerName.ddim: SchedulerSpec(DDIMScheduler, {}, "DDIM"),
    SchedulerName.euler: SchedulerSpec(EulerDiscreteScheduler, {}, "Euler"),
    SchedulerName.euler_a: SchedulerSpec(EulerAncestralDiscreteScheduler, {}, "Euler a"),
    SchedulerName.heun: SchedulerSpec(HeunDiscreteScheduler, {}, "Heun"),
    SchedulerName.dpmpp_2m: SchedulerSpec(DPMSolverMultistepScheduler, {}, "DPM++ 2M"),
    SchedulerName.dpmpp_2m_karras: SchedulerSpec(DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    SchedulerName.unipc: SchedulerSpec(UniPCMultistepScheduler, {}, "UniPC"),
}


class UnknownUserError(LookupError):
    """The user has no model: answered with 404."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded: answered with 503, and not cached, so the next request tries again."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory during a generation: answered with 503."""


@dataclass
class LoadedModel:
    """A pipeline on the device, and the scheduler it shipped with (each request gets a fresh copy)."""

    pipeline: StableDiffusionPipeline
    scheduler_class: type[SchedulerMixin]
    scheduler_config: dict


@dataclass
class CacheStats:
    """What the model cache has done since start."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass(frozen=True)
class BatchKey:
    """What jobs must share to run in one pipeline call."""

    model_id: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: SchedulerName | None


@dataclass(frozen=True)
class BatchItem:
    """One job's share of a batch: its prompts, and the seed of its first image."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_images: int


def choose_device(preference: str, cuda_available: bool, mps_available: bool) -> str:
    """The device to run on: the configured one, or with ``auto`` CUDA, then MPS, then CPU."""
    if preference != "auto":
        return preference
    if cuda_available:
        return "cuda"
    return "mps" if mps_available else "cpu"


def choose_dtype(preference: str, device: str) -> torch.dtype:
    """The configured dtype, or with ``auto`` float16 on CUDA and float32 elsewhere."""
    if preference == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, preference)


def scheduler_name(scheduler_class: type[SchedulerMixin]) -> str:
    """The API's name for a model's own scheduler class (``pndm`` for PNDMScheduler), else the class name."""
    for name, spec in SCHEDULERS.items():
        if spec.scheduler_class is scheduler_class and not spec.options:
            return name.value
    return scheduler_class.__name__


def sampler_label(name: str) -> str:
    """A1111's sampler name for an API scheduler name."""
    try:
        return SCHEDULERS[SchedulerName(name)].label
    except ValueError:  # the model's own scheduler, outside the API's set
        return name


class ModelService:
    """Resolves users to models, keeps an LRU cache of pipelines on the device, and runs batches on them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = choose_device(settings.device, torch.cuda.is_available(), torch.backends.mps.is_available())
        self.dtype = choose_dtype(settings.dtype, self.device)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._models_lock = threading.Lock()
        self.cache_stats = CacheStats()

    def loaded_models(self) -> list[str]:
        """Ids of the models in memory, least recently used first."""
        with self._models_lock:
            return list(self._models)

    def model_for_user(self, user_id: str) -> str:
        """The model id that serves ``user_id``; raises UnknownUserError when there is none."""
        model_id = self.settings.model_for_user(user_id)
        if model_id is None:
            raise UnknownUserError(
                f"user '{user_id}' has no model; map it in SD_USER_MODELS or SD_USER_MODELS_FILE (see GET /models)"
            )
        return model_id

    def run_batch(
        self, key: BatchKey, items: list[BatchItem], on_step: Callable[[int, int], None]
    ) -> tuple[list[list[Image.Image]], str]:
        """One pipeline call for all items (loading the model on a miss): each item's images, and the scheduler's name.

        ``on_step(step, total)`` runs after each denoising step; an exception it raises aborts the call.
        """
        loaded = self._pipeline(key.model_id)
        pipeline = loaded.pipeline
        pipeline.scheduler, scheduler = self._fresh_scheduler(loaded, key.scheduler)
        # One CPU generator per image: an image is the same alone or in any batch, on any device.
        generators = [torch.Generator("cpu").manual_seed(item.seed + i) for item in items for i in range(item.num_images)]
        try:
            output = pipeline(
                prompt=[item.prompt for item in items for _ in range(item.num_images)],
                negative_prompt=[item.negative_prompt or "" for item in items for _ in range(item.num_images)],
                num_inference_steps=key.num_inference_steps,
                guidance_scale=key.guidance_scale,
                width=key.width,
                height=key.height,
                generator=generators,
                callback_on_step_end=lambda pipe, index, timestep, tensors: on_step(index + 1, pipe.num_timesteps) or tensors,
            )
        except torch.OutOfMemoryError as error:
            self.free_memory()
            raise DeviceOutOfMemoryError(
                f"{self.device} ran out of memory for {len(generators)} image(s) of {key.width}x{key.height}; "
                "ask for fewer or smaller images, or lower SD_MAX_BATCH_SIZE or SD_MAX_LOADED_MODELS"
            ) from error
        images = iter(output.images)
        return [[next(images) for _ in range(item.num_images)] for item in items], scheduler

    def preload(self, model_id: str) -> None:
        """Load ``model_id`` into the cache now (raises ModelLoadError when it cannot load)."""
        self._pipeline(model_id)

    def unload(self, model_id: str | None = None) -> list[str]:
        """Drop one cached pipeline (or all) and free their memory; returns the ids dropped."""
        with self._models_lock:
            if model_id is None:
                unloaded = list(self._models)
            else:
                unloaded = [model_id] if model_id in self._models else []
            for unloaded_id in unloaded:
                del self._models[unloaded_id]
        self.free_memory()
        return unloaded

    @staticmethod
    def _fresh_scheduler(loaded: LoadedModel, name: SchedulerName | None) -> tuple[SchedulerMixin, str]:
        """A new scheduler for one call (no state carried over): the named one or the model's own; and its name."""
        if name is None:
            return loaded.scheduler_class.from_config(loaded.scheduler_config), scheduler_name(loaded.scheduler_class)
        spec = SCHEDULERS[name]
        return spec.scheduler_class.from_config(loaded.scheduler_config, **spec.options), name.value

    def _pipeline(self, model_id: str) -> LoadedModel:
        """The cached pipeline of ``model_id``; on a miss, evict LRU ones to make room, then load."""
        with self._models_lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                self.cache_stats.hits += 1
                return self._models[model_id]
            self.cache_stats.misses += 1
            room = self.settings.max_loaded_models - 1
            evicted = [self._models.popitem(last=False)[0] for _ in range(len(self._models) - room)]
            self.cache_stats.evictions += len(evicted)
        if evicted:
            logger.info("evicted %s to load %s (SD_MAX_LOADED_MODELS=%d)", evicted, model_id, room + 1)
            self.free_memory()
        loaded = self._load(model_id)
        with self._models_lock:
            self._models[model_id] = loaded
        return loaded

    def _load(self, model_id: str) -> LoadedModel:
        """Device worker: ``from_pretrained`` a hub id or a local folder, and move it to the device."""
        source = self.settings.model_source(model_id)
        started = time.perf_counter()
        options = {} if self.settings.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(source, dtype=self.dtype, **options)
        except Exception as error:
            raise ModelLoadError(self._load_error_message(model_id, source, error)) from error
        pipeline = pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        self._configure_attention(pipeline)
        seconds = time.perf_counter() - started
        self.cache_stats.load_seconds += seconds
        logger.info("loaded model %s from %s in %.2fs", model_id, source, seconds)
        return LoadedModel(pipeline, type(pipeline.scheduler), dict(pipeline.scheduler.config))

    def _load_error_message(self, model_id: str, source: str, error: Exception) -> str:
        """Say which model failed, why, and which setting would fix it."""
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
        if Path(source).is_dir():
            return f"could not load model '{model_id}' from folder {source} ({reason}); it must be a diffusers pipeline folder"
        return (
            f"could not download model '{model_id}' from the Hugging Face hub ({reason}); without network, "
            f"put the model under {self.settings.models_dir}/ and set SD_DEFAULT_MODEL or SD_USER_MODELS to its folder"
        )

    def _configure_attention(self, pipeline: StableDiffusionPipeline) -> None:
        """xformers on CUDA when installed and enabled (else PyTorch SDPA); attention slicing per setting."""
        if self.device == "cuda" and self.settings.enable_xformers:
            try:
                pipeline.enable_xformers_memory_efficient_attention()
            except Exception as error:  # xformers missing or built for another torch: SDPA stays.
                logger.info("xformers not used (%s); PyTorch SDPA attention runs", error)
        slicing = self.settings.attention_slicing
        if slicing == "on" or (slicing == "auto" and self.device == "mps"):
            pipeline.enable_attention_slicing()

    def encode(self, model_id: str, parameters: GenerationParameters, images: list[Image.Image]) -> list[bytes]:
        """PNG-encode each image with its A1111 ``parameters`` text chunk (image i has seed + i)."""
        pngs = []
        for index, image in enumerate(images):
            text = a1111_parameters(
                parameters.prompt,
                parameters.negative_prompt,
                parameters.num_inference_steps,
                sampler_label(parameters.scheduler),
                parameters.guidance_scale,
                parameters.seed + index,
                parameters.width,
                parameters.height,
                model_id,
            )
            pngs.append(encode_png(image, text))
        return pngs

    def free_memory(self) -> None:
        """Collect garbage, and return cached blocks to the driver on CUDA."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
