"""SD_COMPILE: each UNet's forward (its attention projections fused) and VAE's decode compiled by torch.compile for a
few batch sizes (calls are padded up to the next one) and any prompt length, warmed at each configured image size
before its model takes jobs, its kernels cached on disk for the next start. LoRA batches run compiled too, from the
UNet's LoRA slots (``compiled_lora``): a second variant of each graph, warmed with the first."""

import copyreg
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttentionProcessor, AttnProcessor2_0
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from config import Settings
from sd_server.engine.compiled_lora import LoraSlots
from sd_server.engine.mixed_adapters import SampleAdapter, adapters_applied

logger = logging.getLogger(__name__)


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch_size``, then ``max_batch_size``: a batch pads to at most twice its images."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch_size})


def padded_size(samples: int, sizes: list[int]) -> int | None:
    """The smallest of ``sizes`` that holds ``samples``; None past the largest."""
    return next((size for size in sizes if size >= samples), None)


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) of a ``WIDTHxHEIGHT`` setting."""
    width, height = text.split("x")
    return int(width), int(height)


# The layers LoRAs target: diffusers' and this service's trainings (the attention projections), and kohya-style files
# (the transformer blocks' projections and feed-forward layers too).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LAYOUT_ADAPTER = "compile_layout"


def wrap_lora_layers(unet: UNet2DConditionModel) -> None:
    """Wrap the layers LoRAs target in peft's LoRA layers, empty and switched off, before compiling. A LoRA loaded
    later then changes no layer's type (the way diffusers' LoRA hotswap keeps compiled graphs valid), and the base's
    batches, which run with adapters switched off, keep their graphs."""
    unet.add_adapter(LoraConfig(r=1, target_modules=LORA_TARGETS), adapter_name=LAYOUT_ADAPTER)
    unet.delete_adapters(LAYOUT_ADAPTER)
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)


def fuse_qkv_projections(unet: UNet2DConditionModel) -> dict[str, AttentionProcessor] | None:
    """Fuse each attention's query, key and value projections into one matmul (key and value in cross-attention), as
    diffusers' ``fuse_qkv_projections`` does, when every processor is PyTorch's SDPA one (not xformers', not added KV
    projections); the unfused processors, to run peft's LoRA layers uncompiled, or None when it did not fuse."""
    unfused = unet.attn_processors
    if not all(type(processor) is AttnProcessor2_0 for processor in unfused.values()):
        return None
    unet.fuse_qkv_projections()
    return unfused


def graphs_compiled() -> int:
    """Graphs TorchDynamo has compiled in this process so far (every recompile adds one)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def pad_batch(value: Any, samples: int, size: int) -> Any:
    """A tensor whose first dimension is the batch, grown to ``size`` rows by repeating its last one; else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == samples < size:
        return torch.cat([value, value[-1:].expand(size - samples, *value.shape[1:])])
    return value


@dataclass
class CompileCounters:
    """The compiles of every compiled UNet and VAE of the process: in all, their seconds, and how many a request waited
    for (a size not warmed, or a recompile); and the LoRA batches that ran uncompiled (adapters that do not fit the
    slots)."""

    compiles: int = 0
    compile_seconds: float = 0.0
    compiles_on_requests: int = 0
    lora_batches_uncompiled: int = 0

    def timed(self, compiled: Callable[..., Any], part: str, *args: Any, warming: bool, **kwargs: Any) -> Any:
        """``compiled(*args, **kwargs)`` without autograd (as the pipelines run: grad mode is part of what a graph is
        guarded on), counting and timing the compiles it made; ``part`` names what compiled in the log."""
        before, started = graphs_compiled(), time.perf_counter()
        with torch.no_grad():
            output = compiled(*args, **kwargs)
        if (compiled_now := graphs_compiled() - before) > 0:
            seconds = time.perf_counter() - started
            self.compiles += compiled_now
            self.compile_seconds += seconds
            self.compiles_on_requests += 0 if warming else compiled_now
            if not warming:
                logger.warning("a request waited %.1f s for the %s to compile (batch %d, latents %s)", seconds, part, args[0].shape[0], tuple(args[0].shape[2:]))
        return output


class CompiledUnet:
    """A UNet's forward in place of its own (``unet.forward``): compiled calls at the padded batch sizes (LoRA batches
    from its LoRA slots), the eager forward for adapters the slots cannot hold and for batches past the largest size."""

    def __init__(
        self, unet: UNet2DConditionModel, sample_sizes: list[int], mode: str, counters: CompileCounters, lora_rank: int
    ) -> None:
        self.unet, self.eager = unet, unet.forward
        self.sample_sizes = sample_sizes  # UNet samples per call: classifier-free guidance runs each image twice
        self.unfused = fuse_qkv_projections(unet)  # before the slots, which add the LoRA updates to the fused layers
        self.fused = unet.attn_processors
        # Slots for as many adapters as a batch has images; none with SD_COMPILE_LORA_RANK=0.
        self.slots = LoraSlots(unet, sample_sizes[-1] // 2, lora_rank) if lora_rank else None
        self.compiled = torch.compile(self.eager, dynamic=False, mode=mode)
        self.warm_sizes: set[tuple[int, int]] = set()  # latent (height, width) warmed at every batch size
        self.uncompiled = threading.local()  # set on the device thread while a batch the slots cannot hold runs
        self.counters = counters
        unet.forward = self  # nn.Module.__call__ finds the instance attribute before the class's forward

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The UNet's output for ``sample``: compiled at its padded batch size when it can be."""
        samples = sample.shape[0]
        size = padded_size(samples, self.sample_sizes)
        if self.slots is not None and self.slots.active:
            self.slots.select(samples, size or samples)  # the slots' hooks index every sample, compiled or not
        if getattr(self.uncompiled, "on", False) or size is None or args:
            return self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        # One contiguous float32 row of timesteps for every scheduler (int64 or float, scalar or per sample), as the
        # warm-up compiled: a compiled graph is guarded on its inputs' dtypes, shapes and strides.
        timesteps = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
        timesteps = timesteps.reshape(1).repeat(size) if timesteps.dim() == 0 else pad_batch(timesteps, samples, size)
        inputs = [pad_batch(sample, samples, size), timesteps, pad_batch(encoder_hidden_states, samples, size)]
        # The same keywords as the warm-up too: the pipelines pass several as None, and guards tell None from absent.
        extra = {name: pad_batch(value, samples, size) for name, value in kwargs.items() if value is not None and name != "return_dict"}
        output = self._timed(*inputs, **extra, warming=False)[0][:samples]
        return UNet2DConditionOutput(sample=output) if kwargs.get("return_dict", True) else (output,)

    def warm(self, latent_height: int, latent_width: int, context: torch.Tensor) -> None:
        """Compile every batch size for latents of this size (``context``: one sample's text embedding)."""
        if (latent_height, latent_width) in self.warm_sizes:
            return
        unet = self.unet
        for size in self.sample_sizes:
            sample = torch.randn(size, unet.config.in_channels, latent_height, latent_width, device=unet.device, dtype=unet.dtype)
            timesteps = torch.full((size,), 999.0, device=unet.device)
            self._timed(sample, timesteps, context.repeat(size, 1, 1), warming=True)
            if self.slots is not None:
                with self.slots.warming():
                    self._timed(sample, timesteps, context.repeat(size, 1, 1), warming=True)
        self.warm_sizes.add((latent_height, latent_width))

    @contextmanager
    def running(self, pipeline: StableDiffusionPipeline, samples: list[SampleAdapter]) -> Iterator[None]:
        """Within the block, image i of the pipeline's calls runs with ``samples[i]``'s adapter: compiled for the base
        model's images and for adapters the LoRA slots hold, uncompiled for others. Call with the checkpoint's lock held."""
        names = {sample.name for sample in samples} - {None}
        if not names:
            with adapters_applied(pipeline, samples):
                yield
        elif self.slots is not None and padded_size(2 * len(samples), self.sample_sizes) and self.slots.hold(names):
            with adapters_applied(pipeline, samples, slotted=self.unet), self.slots.applied(samples):
                yield
        else:
            self.counters.lora_batches_uncompiled += 1
            with adapters_applied(pipeline, samples), self.eager_on_this_thread():
                yield

    @contextmanager
    def eager_on_this_thread(self) -> Iterator[None]:
        """Within the block, this thread's calls run uncompiled, the attention projections unfused (peft's LoRA layers
        apply only when they are called). The fused processors come back as the same objects, which the compiled
        graphs are guarded on."""
        self.uncompiled.on = True
        if self.unfused is not None:
            self.unet.set_attn_processor(dict(self.unfused))  # it takes each processor out of the dict it is given
        try:
            yield
        finally:
            if self.unfused is not None:
                self.unet.set_attn_processor(dict(self.fused))
            self.uncompiled.on = False

    def _timed(self, *args: Any, warming: bool, **kwargs: Any) -> Any:
        """The compiled call (a tuple), counting and timing the compiles it made."""
        # Prompts of any length (77 tokens a chunk, long prompts take more) share one graph: the token count is symbolic.
        torch._dynamo.maybe_mark_dynamic(args[2], 1)  # a hint: a model whose graph cannot take it recompiles instead of failing
        return self.counters.timed(self.compiled, "UNet", *args, **kwargs, return_dict=False, warming=warming)


class CompiledVaeDecode:
    """A VAE's decode in place of its own (``vae.decode``): compiled at the padded batch sizes (images per call),
    uncompiled for batches past the largest."""

    def __init__(self, vae: AutoencoderKL, batch_sizes: list[int], mode: str, counters: CompileCounters) -> None:
        self.vae, self.eager = vae, vae.decode
        self.batch_sizes = batch_sizes
        self.compiled = torch.compile(self.eager, dynamic=False, mode=mode)
        self.warm_sizes: set[tuple[int, int]] = set()  # latent (height, width) warmed at every batch size
        self.counters = counters
        vae.decode = self  # as the UNet's forward: the instance attribute hides the class's method

    def __call__(self, latents: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        """The pictures of ``latents`` (AutoencoderKL's decode takes a generator and draws nothing with it)."""
        images = latents.shape[0]
        size = padded_size(images, self.batch_sizes)
        if size is None:
            return self.eager(latents, return_dict=return_dict)
        padded = pad_batch(latents.contiguous(), images, size)
        pictures = self.counters.timed(self.compiled, "VAE decoder", padded, return_dict=False, warming=False)[0][:images]
        return DecoderOutput(sample=pictures) if return_dict else (pictures,)

    def warm(self, latent_height: int, latent_width: int) -> None:
        """Compile every batch size for latents of this size."""
        if (latent_height, latent_width) in self.warm_sizes:
            return
        vae = self.vae
        for size in self.batch_sizes:
            latents = torch.randn(size, vae.config.latent_channels, latent_height, latent_width, device=vae.device, dtype=vae.dtype)
            self.counters.timed(self.compiled, "VAE decoder", latents, return_dict=False, warming=True)
        self.warm_sizes.add((latent_height, latent_width))


def memory_format_named(name: str) -> torch.memory_format:
    """The memory format whose str() is ``name`` ("torch.channels_last"): SD_COMPILE pickles memory formats by name, as
    torch pickles layouts. Inductor's disk-cache keys pickle them, and pickle would name whichever module came first in
    sys.modules holding ``torch``: keys that changed with the import order, so a process started another way (a
    benchmark, a test, another entry point) missed every kernel another had cached."""
    memory_format = getattr(torch, name.removeprefix("torch."))
    if not isinstance(memory_format, torch.memory_format):
        raise ValueError(f"{name} is not a memory format")
    return memory_format


def memory_format_by_name(memory_format: torch.memory_format) -> tuple[Callable[[str], torch.memory_format], tuple[str]]:
    """Pickle's reduction of a memory format: ``memory_format_named`` of its name."""
    return memory_format_named, (str(memory_format),)


class PipelineCompiler:
    """The engine's SD_COMPILE: compiles each checkpoint's UNet and VAE decode once (identical components are one
    module), warms them, and reports compile counts and seconds."""

    def __init__(self, settings: Settings, max_batch_size: int) -> None:
        self.enabled = settings.compile
        self.mode = settings.compile_mode
        self.lora_rank = settings.compile_lora_rank
        self.vae = settings.compile_vae
        self.batch_sizes = sorted(set(settings.compile_batch_sizes or default_batch_sizes(max_batch_size)))
        self.image_sizes = [parse_size(size) for size in settings.compile_sizes]
        self.cache_dir = settings.compile_cache_dir or settings.models_dir / ".compile-cache"
        self.counters = CompileCounters()
        if self.enabled:
            self._use_cache_dir(self.cache_dir)
            copyreg.pickle(torch.memory_format, memory_format_by_name)
            # Every UNet's graphs are the one forward function's: past TorchDynamo's default of 8 for it (4 batch sizes
            # at 2 image sizes, or 2 image sizes with the LoRA slots' variant), later shapes would run uncompiled without
            # a word.
            graphs = len(self.batch_sizes) * (len(self.image_sizes) + 1) * (2 if self.lora_rank else 1)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * graphs)
            torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 16 * graphs)

    def compiled(self, pipeline: StableDiffusionPipeline) -> CompiledUnet | None:
        """The pipeline's compiled UNet, compiled now (with its VAE's decode) if it is not yet; None when SD_COMPILE is
        off."""
        if not self.enabled:
            return None
        unet = pipeline.unet
        if not isinstance(unet.forward, CompiledUnet):
            wrap_lora_layers(unet)
            # Classifier-free guidance doubles the samples; a batch without it pads up to the same sizes.
            CompiledUnet(unet, [2 * size for size in self.batch_sizes], self.mode, self.counters, self.lora_rank)
        if self._compiles_vae(pipeline) and not isinstance(pipeline.vae.decode, CompiledVaeDecode):
            CompiledVaeDecode(pipeline.vae, self.batch_sizes, self.mode, self.counters)
        return unet.forward

    def is_warm(self, pipeline: StableDiffusionPipeline) -> bool:
        """True when SD_COMPILE is off, or the pipeline's UNet (and VAE decode) is compiled at every configured size."""
        if not self.enabled:
            return True
        sizes = set(self.latent_sizes(pipeline))
        unet, decode = pipeline.unet.forward, pipeline.vae.decode
        vae_warm = not self._compiles_vae(pipeline) or (isinstance(decode, CompiledVaeDecode) and sizes <= decode.warm_sizes)
        return isinstance(unet, CompiledUnet) and sizes <= unet.warm_sizes and vae_warm

    def warm(self, pipeline: StableDiffusionPipeline) -> None:
        """Compile the pipeline's UNet and VAE decode at every batch size and configured image size, unless they are
        (minutes the first time; seconds from the disk cache). Call with the checkpoint's lock held."""
        unet = self.compiled(pipeline)
        if unet is None or self.is_warm(pipeline):
            return
        with torch.no_grad():  # a context that requires grad would make the warm-up graphs ones no request matches
            context = pipeline.encode_prompt("", pipeline.unet.device, 1, False)[0]
        decode = pipeline.vae.decode if isinstance(pipeline.vae.decode, CompiledVaeDecode) else None
        # As the base model's batches run: LoRA layers off (a LoRA batch may have left them on).
        with adapters_applied(pipeline, []):
            for latent_height, latent_width in self.latent_sizes(pipeline):
                self._warm_size(unet, decode, latent_height, latent_width, context)

    def _compiles_vae(self, pipeline: StableDiffusionPipeline) -> bool:
        """SD_COMPILE_VAE, for the VAEs whose decode this compiles (AutoencoderKL's: every Stable Diffusion 1.x and 2.x)."""
        return self.vae and isinstance(pipeline.vae, AutoencoderKL)

    @staticmethod
    def _warm_size(unet: CompiledUnet, decode: CompiledVaeDecode | None, latent_height: int, latent_width: int, context: torch.Tensor) -> None:
        """Compile every batch size at one latent size, and log how long it took."""
        started = time.perf_counter()
        unet.warm(latent_height, latent_width, context)
        if decode is not None:
            decode.warm(latent_height, latent_width)
        logger.info("compiled for %dx%d latents in %.1f s", latent_width, latent_height, time.perf_counter() - started)

    def latent_sizes(self, pipeline: StableDiffusionPipeline) -> list[tuple[int, int]]:
        """(height, width) of the latents of the model's native size and of SD_COMPILE_SIZES."""
        factor = pipeline.vae_scale_factor
        native = pipeline.unet.config.sample_size
        sizes = [(native, native), *((height // factor, width // factor) for width, height in self.image_sizes)]
        return list(dict.fromkeys(sizes))

    def report(self) -> dict:
        """Whether SD_COMPILE is on, its mode and batch sizes, and the compiles so far: in all, their seconds, and how
        many a request waited for."""
        counters = asdict(self.counters)
        counters["compile_seconds"] = round(counters["compile_seconds"], 3)
        return {
            "enabled": self.enabled,
            "mode": self.mode,
            "batch_sizes": self.batch_sizes,
            "lora_rank": self.lora_rank,
            "vae": self.vae,
            "cache_dir": str(self.cache_dir) if self.enabled else None,
            **counters,
        }

    @staticmethod
    def _use_cache_dir(directory: Path) -> None:
        """Keep Inductor's kernels (Triton's among them) in ``directory``. Importing torch's libraries already sets
        TORCHINDUCTOR_CACHE_DIR to a default, so the setting overrides it."""
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory.resolve())
