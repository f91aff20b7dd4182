"""The checkpoint cache: pipelines in two tiers budgeted in bytes (the device, then host RAM), least recently used
first out, with components that several checkpoints share (a DreamBooth UNet on a common VAE) held once."""

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Set
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from config import Settings
from sd_server.engine.devices import (
    GIB,
    cache_budgets,
    configure_attention,
    configure_memory_format,
    free_memory,
    module_bytes,
    module_device,
)
from sd_server.errors import ModelLoadError, first_line
from sd_server.storage.model_files import checkpoint_location

logger = logging.getLogger(__name__)


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
    dropping: bool = False  # being unloaded: no new batch may start on it
    fresh: bool = True  # brought in for the next batch: that batch is not a cache hit
    in_use: int = 0
    adapters: OrderedDict[str, Adapter] = field(default_factory=OrderedDict)  # least recently used first
    derived: dict[str, Any] = field(default_factory=dict)  # img2img / inpainting pipelines on the same modules
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the pipeline runs or its adapters change

    @property
    def ready(self) -> bool:
        """On the device, not being moved or unloaded: a batch can run on it."""
        return self.tier is Tier.device and not self.moving and not self.dropping


@dataclass
class Counters:
    """What one tier of the cache has done since start."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class CheckpointCache:
    """Checkpoints by source, least recently used first; ``lock`` guards the structures (held briefly), and
    ``residency`` lets one thread at a time load checkpoints, move weights or load adapters: loading creates
    modules under accelerate's init_empty_weights, which patches torch.nn.Module for every thread while it runs."""

    def __init__(
        self, settings: Settings, device: str, dtype: torch.dtype, on_load: Callable[[StableDiffusionPipeline], object] = lambda pipeline: None
    ) -> None:
        self.settings, self.device, self.dtype = settings, device, dtype
        self.on_load = on_load  # what a loaded pipeline gets before it is counted (SD_COMPILE's wrapping: its LoRA slots)
        self.budgets = dict(zip((Tier.device, Tier.cpu), cache_budgets(settings, device)))
        self.counters = {Tier.device: Counters(), Tier.cpu: Counters()}
        self.checkpoints: OrderedDict[str, CachedCheckpoint] = OrderedDict()
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)  # notified when a batch lets go of a checkpoint
        self.residency = threading.RLock()
        self._components: dict[str, Component] = {}  # fingerprint -> component
        self._file_hashes: dict[tuple[str, int, int], str] = {}

    def get(self, source: str) -> CachedCheckpoint | None:
        """The cached checkpoint of ``source``, in either tier, or None."""
        with self.lock:
            return self.checkpoints.get(source)

    def is_ready(self, source: str) -> bool:
        """True when the checkpoint is on the device and not being moved."""
        checkpoint = self.get(source)
        return checkpoint is not None and checkpoint.ready

    def bring_to_device(self, source: str, keep: Set[str]) -> CachedCheckpoint | None:
        """The checkpoint on the device: moved up from host RAM, else loaded from disk or the hub, moving least
        recently used checkpoints not in ``keep`` and not running down a tier; None when there is no room now.
        Call with ``residency`` held."""
        cached = self.get(source)
        if cached is not None and cached.dropping:
            return None  # no room until the unload is done; then it loads again
        checkpoint = cached or self._load(source)
        if not checkpoint.ready:
            if not self._promote(checkpoint, {*keep, source}):
                return None
            self.counters[Tier.cpu].hits += cached is not None
        return checkpoint

    def pin(self, source: str) -> CachedCheckpoint | None:
        """The ready checkpoint, marked in use (so never moved), counted as a hit; None when it is not ready."""
        with self.lock:
            checkpoint = self.checkpoints.get(source)
            if checkpoint is None or not checkpoint.ready:
                return None
            checkpoint.in_use += 1
            self.checkpoints.move_to_end(source)
            self.counters[Tier.device].hits += 0 if checkpoint.fresh else 1
            checkpoint.fresh = False
            return checkpoint

    def unpin(self, checkpoint: CachedCheckpoint) -> None:
        """The batch that pinned ``checkpoint`` is done with it."""
        with self.lock:
            checkpoint.in_use -= 1
            self.idle.notify_all()

    def unload(self, source: str | None = None) -> list[str]:
        """Drop one cached checkpoint (or all), with its adapters, and free their memory, once the batches running
        on them have ended (no new one starts meanwhile); returns the ones dropped."""
        with self.lock:
            dropped = [c for c in self.checkpoints.values() if source in (None, c.source)]
            for checkpoint in dropped:
                checkpoint.dropping = True
            self.idle.wait_for(lambda: not any(checkpoint.in_use for checkpoint in dropped))
        with self.residency:
            with self.lock:
                for checkpoint in dropped:
                    if self.checkpoints.get(checkpoint.source) is checkpoint:  # else another unload took it
                        self._forget(checkpoint)
            self._settle()
        return [checkpoint.source for checkpoint in dropped]

    def report(self) -> dict:
        """Per tier: resident checkpoints, bytes, budget, hits, misses, evictions, load seconds; and how many
        components several checkpoints share."""
        with self.lock:
            tiers = {
                tier.value: {
                    "models": [c.source for c in self.checkpoints.values() if c.tier is tier],
                    "bytes": self._tier_bytes(tier),
                    "budget_bytes": self.budgets[tier],
                    **asdict(self.counters[tier]),
                }
                for tier in Tier
            }
            shared = sum(1 for component in self._components.values() if len(component.users) > 1)
        return {**tiers, "shared_components": shared}

    def _load(self, source: str) -> CachedCheckpoint:
        """``from_pretrained`` a hub id or local folder into host RAM, passing in the components already held."""
        location = checkpoint_location(self.settings.models_dir, source)
        options = {} if self.settings.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        started = time.perf_counter()
        try:
            fingerprints = self._fingerprints(self._local_folder(location))
            with self.lock:
                held = {name: self._components[f].module for name, f in fingerprints.items() if f in self._components}
            pipeline = StableDiffusionPipeline.from_pretrained(location, dtype=self.dtype, **options, **held)
        except Exception as error:
            raise self._load_error(source, location, error) from error
        pipeline.set_progress_bar_config(disable=True)
        configure_attention(pipeline, self.device, self.settings)
        configure_memory_format(pipeline, self.device, self.settings)
        self.on_load(pipeline)
        checkpoint = self._register(source, pipeline, fingerprints)
        seconds = time.perf_counter() - started
        self.counters[Tier.cpu].misses += 1
        self.counters[Tier.cpu].load_seconds += seconds
        logger.info("loaded model %s from %s in %.2fs (%d components shared)", source, location, seconds, len(held))
        return checkpoint

    def _load_error(self, source: str, location: str, error: Exception) -> ModelLoadError:
        """Which model failed and which setting would fix it, for the client; where and why, for the log."""
        detail = f"{location}: {type(error).__name__}: {first_line(error)}"
        if Path(location).is_dir():
            message = f"could not load model '{source}': its folder under SD_MODELS_DIR must be a diffusers pipeline folder"
        else:
            message = (
                f"could not download model '{source}' from the Hugging Face hub; without network, put the model "
                "under SD_MODELS_DIR and set SD_DEFAULT_MODEL or SD_USER_MODELS to its folder"
            )
        return ModelLoadError(message, detail=detail)

    def _local_folder(self, location: str) -> Path:
        """The checkpoint's folder: itself when local, else its hub snapshot (downloaded once, then cached)."""
        if Path(location).is_dir():
            return Path(location)
        skipped = {} if self.settings.safety_checker else {"safety_checker": None}
        return Path(StableDiffusionPipeline.download(location, **skipped))

    def _register(self, source: str, pipeline: StableDiffusionPipeline, fingerprints: dict[str, str]) -> CachedCheckpoint:
        """Add a loaded pipeline to the host RAM tier, recording each component under its fingerprint."""
        components = {}
        with self.lock:
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
            self.checkpoints[source] = checkpoint
        return checkpoint

    def _promote(self, checkpoint: CachedCheckpoint, keep: Set[str]) -> bool:
        """Move ``checkpoint`` to the device tier, first moving others down (and out of host RAM) to stay in budget."""
        started = time.perf_counter()
        with self.lock:
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
        with self.lock:
            checkpoint.moving, checkpoint.fresh = False, True
            self.checkpoints.move_to_end(checkpoint.source)
        self.counters[Tier.device].misses += 1
        self.counters[Tier.device].load_seconds += time.perf_counter() - started
        return True

    def _make_room(self, tier: Tier, keep: Set[str]) -> bool:
        """Move least recently used idle checkpoints not in ``keep`` out of ``tier`` (device -> host RAM -> out) until
        it is within budget; on failure undo and return False. Call with the lock held."""
        moved = []
        while self._tier_bytes(tier) > self.budgets[tier]:
            victim = next(
                (c for c in self.checkpoints.values() if c.tier is tier and not c.moving and not c.in_use and c.source not in keep),
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
        del self.checkpoints[checkpoint.source]
        for fingerprint in checkpoint.components.values():
            component = self._components[fingerprint]
            component.users.discard(checkpoint.source)
            if not component.users:
                del self._components[fingerprint]

    def _settle(self, released: bool = True) -> None:
        """Move each component where the tiers say (the device when a device-tier checkpoint uses it), down first;
        free memory when something was dropped (``released``) or moved down (a full garbage collection is slow)."""
        with self.lock:
            on_device = self._device_fingerprints()
            moves = [(c.module, self.device if f in on_device else "cpu") for f, c in self._components.items()]
        for module, target in sorted(moves, key=lambda move: move[1] == self.device):
            if module_device(module) != target:
                module.to(target)
                released = released or target == "cpu"
        if released:
            free_memory(self.device)

    def _device_fingerprints(self) -> set[str]:
        return {f for c in self.checkpoints.values() if c.tier is Tier.device for f in c.components.values()}

    def _tier_bytes(self, tier: Tier) -> int:
        """Bytes held in ``tier``: each component once, where it is, plus the adapters. Call with the lock held."""
        on_device = self._device_fingerprints()
        in_tier = {f for c in self.checkpoints.values() if c.tier is tier for f in c.components.values()}
        held = in_tier if tier is Tier.device else in_tier - on_device
        adapters = sum(a.nbytes for c in self.checkpoints.values() if c.tier is tier for a in c.adapters.values())
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
