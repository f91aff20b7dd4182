"""Loads, caches and runs Stable Diffusion pipelines: checkpoints in a two-tier byte-budgeted cache, LoRA adapters."""

import gc
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Set
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import diffusers
import safetensors.torch
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
from model_registry import checkpoint_location, lora_file
from schemas import CheckpointModel, GenerationParameters, LoraModel, SchedulerName, UserModel

logger = logging.getLogger(__name__)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

GIB = 1024**3
STAGED_ADAPTERS = 16  # most LoRA files read ahead by the loader and not yet loaded into a pipeline


def first_line(error: Exception) -> str:
    """The first line of an error's message, at most 300 characters."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


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


class ModelLoadError(RuntimeError):
    """A model could not be loaded: answered with 503, and not cached, so the next request tries again."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory during a generation: answered with 503."""


class InvalidAdapterError(ValueError):
    """A LoRA file that does not load onto its base checkpoint: answered with 422."""


class Tier(str, Enum):
    """Where a cached checkpoint's weights are: on the device (ready to run), or in host RAM (quick to move back)."""

    device = "device"
    cpu = "cpu"


@dataclass
class Component:
    """A module (UNet, VAE, text encoder, ...) held once, and the checkpoints that use it."""

    module: torch.nn.Module
    nbytes: int
    users: set[str]


@dataclass
class Adapter:
    """A LoRA adapter loaded into a base pipeline."""

    source: str
    nbytes: int
    fresh: bool = True  # loaded for the next batch: that batch is not a cache hit


@dataclass
class CachedCheckpoint:
    """A checkpoint's pipeline in the cache: its tier, its components by fingerprint, its adapters, its users now."""

    source: str
    pipeline: StableDiffusionPipeline
    scheduler_class: type[SchedulerMixin]
    scheduler_config: dict
    components: dict[str, str]  # component name -> fingerprint
    tier: Tier = Tier.cpu
    moving: bool = False
    fresh: bool = True  # brought in for the next batch: that batch is not a cache hit
    in_use: int = 0
    adapters: OrderedDict[str, Adapter] = field(default_factory=OrderedDict)  # least recently used first
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the pipeline runs or its adapters change

    @property
    def ready(self) -> bool:
        """On the device and not being moved: a batch can run on it."""
        return self.tier is Tier.device and not self.moving


@dataclass
class Counters:
    """What one tier of the cache has done since start."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass(frozen=True)
class BatchKey:
    """What jobs must share to run in one pipeline call: one model (so one adapter set), size, steps, CFG, sampler."""

    model: UserModel
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


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def module_device(module: torch.nn.Module) -> str:
    """The device type (cuda, mps, cpu) of a module's first parameter."""
    return next(module.parameters()).device.type


def cache_budgets(settings: Settings, device: str) -> tuple[int, int]:
    """Bytes of the device tier and of the host RAM tier: the settings, or defaults that fit this machine."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if settings.cache_device_gb is not None:
        device_bytes = int(settings.cache_device_gb * GIB)
    elif device == "cuda":
        device_bytes = int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    else:
        device_bytes = ram // 4
    if settings.cache_cpu_gb is not None:
        return device_bytes, int(settings.cache_cpu_gb * GIB)
    return device_bytes, 0 if device == "cpu" else ram // 4


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
    """Keeps checkpoints in a two-tier cache budgeted in bytes (device, then host RAM), loads identical components
    once, puts LoRA adapters on resident bases, and runs batches. The job queue's loader and device threads call it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = choose_device(settings.device, torch.cuda.is_available(), torch.backends.mps.is_available())
        self.dtype = choose_dtype(settings.dtype, self.device)
        self.budgets = dict(zip((Tier.device, Tier.cpu), cache_budgets(settings, self.device)))
        self.counters = {Tier.device: Counters(), Tier.cpu: Counters()}
        self.adapter_counters = Counters()
        self._checkpoints: OrderedDict[str, CachedCheckpoint] = OrderedDict()  # least recently used first
        self._components: dict[str, Component] = {}  # fingerprint -> component
        self._staged: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # LoRA files read ahead: name -> (source, tensors)
        self._file_hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.RLock()  # guards the structures above; held briefly
        # One thread at a time loads checkpoints, moves weights or loads adapters: loading creates modules under
        # accelerate's init_empty_weights, which patches torch.nn.Module for every thread while it runs.
        self._residency = threading.RLock()

    # --- queries, from any thread --------------------------------------------------------------------

    def loaded_models(self) -> list[str]:
        """Checkpoints in memory (either tier), least recently used first."""
        with self._lock:
            return list(self._checkpoints)

    def is_ready(self, model: UserModel) -> bool:
        """True when a batch for ``model`` can start now: its checkpoint is on the device (a LoRA loads in ms)."""
        with self._lock:
            checkpoint = self._checkpoints.get(model.base)
            return checkpoint is not None and checkpoint.ready

    def needs_loading(self, model: UserModel) -> bool:
        """True when the loader has work for ``model``: its checkpoint is not ready, or its LoRA file could be read
        ahead (not loaded, not read yet, and room among the files read ahead)."""
        if not self.is_ready(model):
            return True
        if isinstance(model, CheckpointModel):
            return False
        name = self._adapter_name(model)
        with self._lock:
            checkpoint = self._checkpoints.get(model.base)
            loaded = checkpoint is not None and name in checkpoint.adapters
            return name is not None and not loaded and name not in self._staged and len(self._staged) < STAGED_ADAPTERS

    def cache_report(self) -> dict:
        """Per tier: resident checkpoints, bytes, budget, hits, misses, evictions, load seconds; and the adapters."""
        with self._lock:
            tiers = {
                tier.value: {
                    "models": [c.source for c in self._checkpoints.values() if c.tier is tier],
                    "bytes": self._tier_bytes(tier),
                    "budget_bytes": self.budgets[tier],
                    **asdict(self.counters[tier]),
                }
                for tier in Tier
            }
            adapters = [adapter for c in self._checkpoints.values() for adapter in c.adapters.values()]
            shared = sum(1 for component in self._components.values() if len(component.users) > 1)
        return {
            **tiers,
            "adapters": {
                "resident": [adapter.source for adapter in adapters],
                "bytes": sum(adapter.nbytes for adapter in adapters),
                "max_adapters": self.settings.max_adapters,
                **asdict(self.adapter_counters),
            },
            "shared_components": shared,
        }

    # --- loading and tiers (loader thread; request threads for uploads and removals) ---------------------

    def prepare(self, model: UserModel, keep: Set[str] = frozenset()) -> bool:
        """Bring ``model``'s checkpoint onto the device (from host RAM, else from disk), moving least recently used
        checkpoints not in ``keep`` and not running down a tier; then load its LoRA (or read the file) ahead.
        False: no room now."""
        with self._residency:
            with self._lock:
                cached = self._checkpoints.get(model.base)
            checkpoint = cached or self._load(model.base)
            if not checkpoint.ready:
                if not self._promote(checkpoint, {*keep, model.base}):
                    return False
                self.counters[Tier.cpu].hits += cached is not None
            if isinstance(model, LoraModel):
                self._load_adapter_ahead(checkpoint, model)
            return True

    def unload(self, source: str | None = None) -> list[str]:
        """Drop one cached checkpoint (or all), with its adapters, and free their memory; returns the ones dropped."""
        with self._residency:
            with self._lock:
                dropped = [c for c in self._checkpoints.values() if source in (None, c.source)]
                for checkpoint in dropped:
                    self._forget(checkpoint)
                self._staged.clear()
            self._settle()
        return [checkpoint.source for checkpoint in dropped]

    def unload_adapter(self, model: LoraModel) -> bool:
        """Take ``model``'s LoRA off its base (after the running batch); True when it was loaded."""
        with self._lock:
            checkpoint = self._checkpoints.get(model.base)
            for name in [name for name, (source, _) in self._staged.items() if source == model.source]:
                del self._staged[name]
        if checkpoint is None:
            return False
        with checkpoint.lock:
            names = [name for name, adapter in checkpoint.adapters.items() if adapter.source == model.source]
            if names:
                checkpoint.pipeline.delete_adapters(names)
            with self._lock:
                for name in names:
                    del checkpoint.adapters[name]
        return bool(names)

    def check_adapter(self, base: str, path: Path) -> None:
        """Load the LoRA file at ``path`` onto ``base`` and take it off again; InvalidAdapterError if it does not load."""
        try:
            tensors = safetensors.torch.load_file(path)
        except Exception as error:
            raise InvalidAdapterError(f"not a readable .safetensors file: {first_line(error)}") from error
        checkpoint = self._pin(CheckpointModel(source=base))
        try:
            with self._residency, checkpoint.lock:
                self._inject(checkpoint.pipeline, tensors, "upload_check")
                checkpoint.pipeline.delete_adapters("upload_check")
        finally:
            self._unpin(checkpoint)

    def _load(self, source: str) -> CachedCheckpoint:
        """``from_pretrained`` a hub id or local folder into host RAM, passing in the components already held."""
        location = checkpoint_location(self.settings.models_dir, source)
        options = {} if self.settings.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        started = time.perf_counter()
        try:
            fingerprints = self._fingerprints(self._local_folder(location))
            with self._lock:
                held = {name: self._components[f].module for name, f in fingerprints.items() if f in self._components}
            pipeline = StableDiffusionPipeline.from_pretrained(location, dtype=self.dtype, **options, **held)
        except Exception as error:
            raise ModelLoadError(self._load_error_message(source, location, error)) from error
        pipeline.set_progress_bar_config(disable=True)
        self._configure_attention(pipeline)
        checkpoint = self._register(source, pipeline, fingerprints)
        seconds = time.perf_counter() - started
        self.counters[Tier.cpu].misses += 1
        self.counters[Tier.cpu].load_seconds += seconds
        logger.info("loaded model %s from %s in %.2fs (%d components shared)", source, location, seconds, len(held))
        return checkpoint

    def _local_folder(self, location: str) -> Path:
        """The checkpoint's folder: itself when local, else its hub snapshot (downloaded once, then cached)."""
        if Path(location).is_dir():
            return Path(location)
        skipped = {} if self.settings.safety_checker else {"safety_checker": None}
        return Path(StableDiffusionPipeline.download(location, **skipped))

    def _register(self, source: str, pipeline: StableDiffusionPipeline, fingerprints: dict[str, str]) -> CachedCheckpoint:
        """Add a loaded pipeline to the host RAM tier, recording each component under its fingerprint."""
        components = {}
        with self._lock:
            for name, module in pipeline.components.items():
                if not isinstance(module, torch.nn.Module):
                    continue
                fingerprint = fingerprints.get(name) or f"{source}:{name}"
                if fingerprint not in self._components:
                    self._components[fingerprint] = Component(module, module_bytes(module), set())
                self._components[fingerprint].users.add(source)
                components[name] = fingerprint
            scheduler = pipeline.scheduler
            checkpoint = CachedCheckpoint(source, pipeline, type(scheduler), dict(scheduler.config), components)
            self._checkpoints[source] = checkpoint
        return checkpoint

    def _promote(self, checkpoint: CachedCheckpoint, keep: Set[str]) -> bool:
        """Move ``checkpoint`` to the device tier, first moving others down (and out of host RAM) to stay in budget."""
        started = time.perf_counter()
        with self._lock:
            needed, budget = self._checkpoint_bytes(checkpoint), self.budgets[Tier.device]
            if needed > budget:
                raise ModelLoadError(
                    f"model '{checkpoint.source}' needs {needed / GIB:.2f} GiB, more than the device cache holds "
                    f"({budget / GIB:.2f} GiB); raise SD_CACHE_DEVICE_GB"
                )
            checkpoint.tier, checkpoint.moving = Tier.device, True
            if not self._make_room(Tier.device, keep):
                checkpoint.tier, checkpoint.moving = Tier.cpu, False
                return False
            dropped_before = self.counters[Tier.cpu].evictions
            self._make_room(Tier.cpu, keep)
        self._settle(released=self.counters[Tier.cpu].evictions > dropped_before)
        with self._lock:
            checkpoint.moving, checkpoint.fresh = False, True
            self._checkpoints.move_to_end(checkpoint.source)
        self.counters[Tier.device].misses += 1
        self.counters[Tier.device].load_seconds += time.perf_counter() - started
        return True

    def _make_room(self, tier: Tier, keep: Set[str]) -> bool:
        """Move least recently used idle checkpoints not in ``keep`` out of ``tier`` (device -> host RAM -> out) until
        it is within budget; on failure undo and return False. Call with the lock held."""
        moved = []
        while self._tier_bytes(tier) > self.budgets[tier]:
            victim = next(
                (c for c in self._checkpoints.values() if c.tier is tier and not c.moving and not c.in_use and c.source not in keep),
                None,
            )
            if victim is None and tier is Tier.device:
                for checkpoint in moved:
                    checkpoint.tier = Tier.device
                return False
            if victim is None:
                break  # host RAM runs over while every model it could drop is needed
            if tier is Tier.device:
                victim.tier = Tier.cpu
                moved.append(victim)
            else:
                self._forget(victim)
                self.counters[Tier.cpu].evictions += 1
        self.counters[Tier.device].evictions += len(moved)
        return True

    def _forget(self, checkpoint: CachedCheckpoint) -> None:
        """Remove a checkpoint from the cache, and the components nothing else uses. Call with the lock held."""
        del self._checkpoints[checkpoint.source]
        for fingerprint in checkpoint.components.values():
            component = self._components[fingerprint]
            component.users.discard(checkpoint.source)
            if not component.users:
                del self._components[fingerprint]

    def _settle(self, released: bool = True) -> None:
        """Move each component where the tiers say (the device when a device-tier checkpoint uses it), down first;
        free memory when something was dropped (``released``) or moved down (a full garbage collection is slow)."""
        with self._lock:
            on_device = self._device_fingerprints()
            moves = [(c.module, self.device if f in on_device else "cpu") for f, c in self._components.items()]
        for module, target in sorted(moves, key=lambda move: move[1] == self.device):
            if module_device(module) != target:
                module.to(target)
                released = released or target == "cpu"
        if released:
            self.free_memory()

    def _device_fingerprints(self) -> set[str]:
        return {f for c in self._checkpoints.values() if c.tier is Tier.device for f in c.components.values()}

    def _tier_bytes(self, tier: Tier) -> int:
        """Bytes held in ``tier``: each component once, where it is, plus the adapters. Call with the lock held."""
        on_device = self._device_fingerprints()
        in_tier = {f for c in self._checkpoints.values() if c.tier is tier for f in c.components.values()}
        held = in_tier if tier is Tier.device else in_tier - on_device
        adapters = sum(a.nbytes for c in self._checkpoints.values() if c.tier is tier for a in c.adapters.values())
        return sum(self._components[f].nbytes for f in held) + adapters

    def _checkpoint_bytes(self, checkpoint: CachedCheckpoint) -> int:
        components = sum(self._components[f].nbytes for f in set(checkpoint.components.values()))
        return components + sum(adapter.nbytes for adapter in checkpoint.adapters.values())

    def _fingerprints(self, folder: Path) -> dict[str, str]:
        """Component name -> SHA-256 of its subfolder's config and weight files, and the dtype they load in."""
        fingerprints = {}
        for subfolder in sorted(path for path in folder.iterdir() if path.is_dir()):
            files = sorted(path for path in subfolder.iterdir() if path.suffix in {".json", ".safetensors", ".bin"})
            if not any(path.suffix != ".json" for path in files):
                continue
            digest = hashlib.sha256(str(self.dtype).encode())
            for path in files:
                digest.update(f"{path.name}:{self._file_hash(path)}".encode())
            fingerprints[subfolder.name] = digest.hexdigest()
        return fingerprints

    def _file_hash(self, path: Path) -> str:
        """SHA-256 of a file, remembered by path, size and modification time."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._file_hashes:
            with path.open("rb") as file:
                self._file_hashes[key] = hashlib.file_digest(file, "sha256").hexdigest()
        return self._file_hashes[key]

    # --- adapters -------------------------------------------------------------------------------------

    def _adapter_name(self, model: LoraModel) -> str | None:
        """The adapter's name in its base pipeline: from its file's path, size and modification time (None: no file)."""
        try:
            path = lora_file(self.settings.models_dir, model.source)
        except FileNotFoundError:
            return None
        stat = path.stat()
        return "lora_" + hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def _load_adapter_ahead(self, checkpoint: CachedCheckpoint, model: LoraModel) -> None:
        """Loader: load a LoRA into its idle base now when that evicts no other adapter; else read the file ahead."""
        name = self._adapter_name(model)
        if name is None or name in checkpoint.adapters:
            return
        if len(checkpoint.adapters) < self.settings.max_adapters and checkpoint.lock.acquire(blocking=False):
            try:
                self._load_adapter(checkpoint, model, name)
            finally:
                checkpoint.lock.release()
            return
        with self._lock:
            if name in self._staged or len(self._staged) >= STAGED_ADAPTERS:
                return
        tensors = self._read_adapter(model)
        with self._lock:
            self._staged[name] = (model.source, tensors)

    def _read_adapter(self, model: LoraModel) -> dict[str, torch.Tensor]:
        try:
            return safetensors.torch.load_file(lora_file(self.settings.models_dir, model.source))
        except Exception as error:
            raise ModelLoadError(
                f"could not read LoRA '{model.source}' ({first_line(error)}); upload it again with POST /users/{{user_id}}/lora"
            ) from error

    def _ensure_adapter(self, checkpoint: CachedCheckpoint, model: LoraModel) -> str:
        """Device worker: the name of ``model``'s adapter in its base, loading it first if it is not there."""
        name = self._adapter_name(model)
        if name is None:
            raise ModelLoadError(f"the LoRA file '{model.source}' is gone; set the user's model again")
        with self._lock:
            if name in checkpoint.adapters:
                checkpoint.adapters.move_to_end(name)
                self.adapter_counters.hits += 0 if checkpoint.adapters[name].fresh else 1
                checkpoint.adapters[name].fresh = False
                return name
        with self._residency, checkpoint.lock:
            if name not in checkpoint.adapters:
                self._load_adapter(checkpoint, model, name)
            checkpoint.adapters[name].fresh = False
        return name

    def _activate(self, checkpoint: CachedCheckpoint, model: UserModel, adapter: str | None) -> None:
        """Give the pipeline exactly this model's adapter set: none for a checkpoint, the one LoRA for a LoRA user.
        Call with the checkpoint's lock held."""
        pipeline = checkpoint.pipeline
        if adapter is None:
            if checkpoint.adapters:
                pipeline.disable_lora()
            return
        if adapter not in checkpoint.adapters:  # removed since it was loaded
            raise ModelLoadError(f"the LoRA '{model.source}' was unloaded; submit the job again")
        pipeline.enable_lora()
        pipeline.set_adapters([adapter], [model.scale])

    def _load_adapter(self, checkpoint: CachedCheckpoint, model: LoraModel, name: str) -> None:
        """Load a LoRA into the pipeline (from the file read ahead, else from disk), dropping the least recently
        used adapters past SD_MAX_ADAPTERS. Call with the residency lock and the checkpoint's lock held."""
        started = time.perf_counter()
        with self._lock:
            staged = self._staged.pop(name, None)
        tensors = staged[1] if staged else self._read_adapter(model)
        while len(checkpoint.adapters) >= self.settings.max_adapters:
            with self._lock:
                oldest, _ = checkpoint.adapters.popitem(last=False)
            checkpoint.pipeline.delete_adapters(oldest)
            self.adapter_counters.evictions += 1
        try:
            self._inject(checkpoint.pipeline, tensors, name)
        except InvalidAdapterError as error:
            raise ModelLoadError(f"could not load LoRA '{model.source}' onto '{model.base}': {error}") from error
        with self._lock:
            checkpoint.adapters[name] = Adapter(model.source, tensor_bytes(tensors.values()))
        self.adapter_counters.misses += 1
        self.adapter_counters.load_seconds += time.perf_counter() - started

    @staticmethod
    def _inject(pipeline: StableDiffusionPipeline, tensors: dict[str, torch.Tensor], name: str) -> None:
        """``load_lora_weights`` under ``name``; InvalidAdapterError (and nothing left behind) when it does not fit."""
        try:
            pipeline.load_lora_weights(dict(tensors), adapter_name=name)
        except Exception as error:
            raise InvalidAdapterError(f"it does not load onto the base model: {first_line(error)}") from error
        if not any(name in names for names in pipeline.get_list_adapters().values()):
            raise InvalidAdapterError("none of its weights match a layer of the base model")

    # --- running (device worker thread) -----------------------------------------------------------------

    def run_batch(
        self, key: BatchKey, items: list[BatchItem], on_step: Callable[[int, int], None]
    ) -> tuple[list[list[Image.Image]], str]:
        """One pipeline call for all items with the key's model and adapter: each item's images, and the scheduler.

        ``on_step(step, total)`` runs after each denoising step; an exception it raises aborts the call.
        """
        checkpoint = self._pin(key.model)
        try:
            adapter = self._ensure_adapter(checkpoint, key.model) if isinstance(key.model, LoraModel) else None
            with checkpoint.lock:
                self._activate(checkpoint, key.model, adapter)
                return self._generate(checkpoint, key, items, on_step)
        finally:
            self._unpin(checkpoint)

    def _pin(self, model: UserModel) -> CachedCheckpoint:
        """The model's checkpoint, on the device and marked in use (so never moved); loaded first if need be."""
        for _ in range(2):
            with self._lock:
                checkpoint = self._checkpoints.get(model.base)
                if checkpoint is not None and checkpoint.ready:
                    checkpoint.in_use += 1
                    self._checkpoints.move_to_end(model.base)
                    self.counters[Tier.device].hits += 0 if checkpoint.fresh else 1
                    checkpoint.fresh = False
                    return checkpoint
            if not self.prepare(model):
                break
        raise ModelLoadError(f"no room on the device for model '{model.base}' while others run; raise SD_CACHE_DEVICE_GB")

    def _unpin(self, checkpoint: CachedCheckpoint) -> None:
        with self._lock:
            checkpoint.in_use -= 1

    def _generate(
        self, checkpoint: CachedCheckpoint, key: BatchKey, items: list[BatchItem], on_step: Callable[[int, int], None]
    ) -> tuple[list[list[Image.Image]], str]:
        pipeline = checkpoint.pipeline
        pipeline.scheduler, scheduler = self._fresh_scheduler(checkpoint, key.scheduler)
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
                "ask for fewer or smaller images, or lower SD_MAX_BATCH_SIZE or SD_CACHE_DEVICE_GB"
            ) from error
        images = iter(output.images)
        return [[next(images) for _ in range(item.num_images)] for item in items], scheduler

    @staticmethod
    def _fresh_scheduler(checkpoint: CachedCheckpoint, name: SchedulerName | None) -> tuple[SchedulerMixin, str]:
        """A new scheduler for one call (no state carried over): the named one or the model's own; and its name."""
        if name is None:
            return checkpoint.scheduler_class.from_config(checkpoint.scheduler_config), scheduler_name(checkpoint.scheduler_class)
        spec = SCHEDULERS[name]
        return spec.scheduler_class.from_config(checkpoint.scheduler_config, **spec.options), name.value

    def _load_error_message(self, source: str, location: str, error: Exception) -> str:
        """Say which model failed, why, and which setting would fix it."""
        reason = f"{type(error).__name__}: {first_line(error)}"
        if Path(location).is_dir():
            return f"could not load model '{source}' from folder {location} ({reason}); it must be a diffusers pipeline folder"
        return (
            f"could not download model '{source}' from the Hugging Face hub ({reason}); without network, "
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
