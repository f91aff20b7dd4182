"""LoRA adapters in resident base pipelines: loaded once per base (least recently used out past SD_MAX_ADAPTERS),
read ahead from disk while the base is busy, and applied per batch: ``set_adapters`` when every image shares one,
each image its own (``mixed_adapters``) when a batch mixes users."""

import hashlib
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline

from config import Settings
from sd_server.domain.models import LoraModel
from sd_server.engine.cache import Adapter, CachedCheckpoint, CheckpointCache, Counters
from sd_server.engine.compiled import CompiledUnet
from sd_server.engine.devices import tensor_bytes
from sd_server.engine.mixed_adapters import SampleAdapter, adapters_applied
from sd_server.errors import InvalidAdapterError, ModelLoadError, first_line
from sd_server.storage.model_files import lora_file

STAGED_ADAPTERS = 16  # most LoRA files read ahead by the loader and not yet loaded into a pipeline


LORA_WEIGHT_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_linear_layer")


def is_lora_weight(key: str) -> bool:
    """True for a LoRA down or up matrix in any of the usual formats (diffusers, PEFT, kohya), not an alpha."""
    return key.endswith(".weight") and any(marker in key for marker in LORA_WEIGHT_MARKERS)


def adapter_parameters(pipeline: StableDiffusionPipeline, name: str) -> int:
    """How many weights the adapter ``name`` put into the pipeline's modules."""
    modules = [module for module in pipeline.components.values() if isinstance(module, torch.nn.Module)]
    return sum(p.numel() for module in modules for key, p in module.named_parameters() if f".{name}." in key)


class AdapterCache:
    """The adapters of the cache's checkpoints, and the LoRA files read ahead; guarded by the cache's locks."""

    def __init__(self, settings: Settings, cache: CheckpointCache) -> None:
        self.settings, self.cache = settings, cache
        self.counters = Counters()
        self._staged: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # name -> (source, tensors)

    def name(self, model: LoraModel) -> str | None:
        """The adapter's name in its base pipeline: from its file's path, size and modification time (None: no file)."""
        try:
            path = lora_file(self.settings.models_dir, model.source)
        except FileNotFoundError:
            return None
        stat = path.stat()
        return "lora_" + hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def can_read_ahead(self, model: LoraModel) -> bool:
        """True when the LoRA is neither loaded into its base nor read yet, and there is room among the files read."""
        name = self.name(model)
        with self.cache.lock:
            checkpoint = self.cache.checkpoints.get(model.base)
            loaded = checkpoint is not None and name in checkpoint.adapters
            return name is not None and not loaded and name not in self._staged and len(self._staged) < STAGED_ADAPTERS

    def load_ahead(self, checkpoint: CachedCheckpoint, model: LoraModel) -> None:
        """Loader: load a LoRA into its idle base now when that evicts no other adapter; else read the file ahead."""
        name = self.name(model)
        if name is None or name in checkpoint.adapters:
            return
        if len(checkpoint.adapters) < self.settings.max_adapters and checkpoint.lock.acquire(blocking=False):
            try:
                self._load(checkpoint, model, name)
            finally:
                checkpoint.lock.release()
            return
        with self.cache.lock:
            if name in self._staged or len(self._staged) >= STAGED_ADAPTERS:
                return
        tensors = self._read(model)
        with self.cache.lock:
            self._staged[name] = (model.source, tensors)

    def ensure(self, checkpoint: CachedCheckpoint, model: LoraModel) -> str:
        """Device worker: the name of ``model``'s adapter in its base, loading it first if it is not there."""
        name = self.name(model)
        if name is None:
            raise ModelLoadError(f"the LoRA file '{model.source}' is gone; set the user's model again")
        with self.cache.lock:
            if name in checkpoint.adapters:
                checkpoint.adapters.move_to_end(name)
                self.counters.hits += 0 if checkpoint.adapters[name].fresh else 1
                checkpoint.adapters[name].fresh = False
                return name
        with self.cache.residency, checkpoint.lock:
            if name not in checkpoint.adapters:
                self._load(checkpoint, model, name)
            checkpoint.adapters[name].fresh = False
        return name

    @staticmethod
    def applied(
        checkpoint: CachedCheckpoint, samples: list[SampleAdapter], unet: CompiledUnet | None = None
    ) -> AbstractContextManager[None]:
        """The block in which each image of a pipeline call runs with its sample's adapter (``adapters_applied``, or
        the compiled ``unet``'s way); ModelLoadError when one of them was unloaded since the batch began. Call with the
        checkpoint's lock held."""
        if missing := {sample.name for sample in samples} - {None} - checkpoint.adapters.keys():
            raise ModelLoadError(f"{len(missing)} LoRA(s) of this batch were unloaded meanwhile; submit the job again")
        return adapters_applied(checkpoint.pipeline, samples) if unet is None else unet.running(checkpoint.pipeline, samples)

    def unload(self, model: LoraModel) -> bool:
        """Take ``model``'s LoRA off its base (after the running batch); True when it was loaded."""
        with self.cache.lock:
            checkpoint = self.cache.checkpoints.get(model.base)
            for name in [name for name, (source, _) in self._staged.items() if source == model.source]:
                del self._staged[name]
        if checkpoint is None:
            return False
        with checkpoint.lock:
            names = [name for name, adapter in checkpoint.adapters.items() if adapter.source == model.source]
            if names:
                checkpoint.pipeline.delete_adapters(names)
            with self.cache.lock:
                for name in names:
                    del checkpoint.adapters[name]
        return bool(names)

    def check(self, checkpoint: CachedCheckpoint, path: Path) -> None:
        """Load the LoRA file at ``path`` onto the checkpoint and take it off again. InvalidAdapterError when it does
        not load, holds NaN or infinite weights, or has weights that match no layer (they would be dropped
        silently, and the user would get the base model's images, or black ones). Call with the checkpoint pinned."""
        try:
            tensors = safetensors.torch.load_file(path)
        except Exception as error:
            raise InvalidAdapterError(f"not a readable .safetensors file: {first_line(error)}") from error
        if not all(torch.isfinite(tensor).all() for tensor in tensors.values() if tensor.is_floating_point()):
            raise InvalidAdapterError("it holds NaN or infinite weights")
        expected = sum(tensor.numel() for key, tensor in tensors.items() if is_lora_weight(key))
        with self.cache.residency, checkpoint.lock:
            self.inject(checkpoint.pipeline, tensors, "upload_check")
            try:
                loaded = adapter_parameters(checkpoint.pipeline, "upload_check")
            finally:
                checkpoint.pipeline.delete_adapters("upload_check")
        if loaded < expected:
            raise InvalidAdapterError(f"{expected - loaded} of its {expected} LoRA weights match no layer of the base model")

    def forget_staged(self) -> None:
        """Drop the files read ahead (their bases are being unloaded)."""
        with self.cache.lock:
            self._staged.clear()

    def report(self) -> dict:
        """The adapters loaded (least recently used first), their bytes, the cap, and what the cache has done."""
        with self.cache.lock:
            adapters = [adapter for c in self.cache.checkpoints.values() for adapter in c.adapters.values()]
        return {
            "resident": [adapter.source for adapter in adapters],
            "bytes": sum(adapter.nbytes for adapter in adapters),
            "max_adapters": self.settings.max_adapters,
            **asdict(self.counters),
        }

    def _read(self, model: LoraModel) -> dict[str, torch.Tensor]:
        try:
            return safetensors.torch.load_file(lora_file(self.settings.models_dir, model.source))
        except Exception as error:
            raise ModelLoadError(
                f"could not read LoRA '{model.source}'; upload it again with POST /users/{{user_id}}/lora",
                detail=first_line(error),
            ) from error

    def _load(self, checkpoint: CachedCheckpoint, model: LoraModel, name: str) -> None:
        """Load a LoRA into the pipeline (from the file read ahead, else from disk), dropping the least recently
        used adapters past SD_MAX_ADAPTERS. Call with the residency lock and the checkpoint's lock held."""
        started = time.perf_counter()
        with self.cache.lock:
            staged = self._staged.pop(name, None)
        tensors = staged[1] if staged else self._read(model)
        while len(checkpoint.adapters) >= self.settings.max_adapters:
            with self.cache.lock:
                oldest, _ = checkpoint.adapters.popitem(last=False)
            checkpoint.pipeline.delete_adapters(oldest)
            self.counters.evictions += 1
        try:
            self.inject(checkpoint.pipeline, tensors, name)
        except InvalidAdapterError as error:
            raise ModelLoadError(f"could not load LoRA '{model.source}' onto '{model.base}': {error.message}") from error
        with self.cache.lock:
            checkpoint.adapters[name] = Adapter(model.source, tensor_bytes(tensors.values()))
        self.counters.misses += 1
        self.counters.load_seconds += time.perf_counter() - started

    @staticmethod
    def inject(pipeline: StableDiffusionPipeline, tensors: dict[str, torch.Tensor], name: str) -> None:
        """``load_lora_weights`` under ``name``; InvalidAdapterError (and nothing left behind) when it does not fit."""
        try:
            pipeline.load_lora_weights(dict(tensors), adapter_name=name)
        except Exception as error:
            raise InvalidAdapterError(f"it does not load onto the base model: {first_line(error)}") from error
        if not any(name in names for names in pipeline.get_list_adapters().values()):
            raise InvalidAdapterError("none of its weights match a layer of the base model")
