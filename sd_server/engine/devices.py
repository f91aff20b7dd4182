"""The device and dtype to run on, how many bytes the cache may hold, and what a module weighs."""

import gc
import logging
import os
from collections.abc import Iterable

import torch
from diffusers import StableDiffusionPipeline

from config import Settings

logger = logging.getLogger(__name__)

GIB = 1024**3
CPU_MAX_BATCH_SIZE = 4  # measured with benchmarks/bench_serving.py on 2 CPU cores; see docs/performance.md
CUDA_MAX_BATCH_SIZE = 8


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


def default_max_batch_size(device: str) -> int:
    """Most images in one pipeline call when SD_MAX_BATCH_SIZE is unset."""
    return CUDA_MAX_BATCH_SIZE if device == "cuda" else CPU_MAX_BATCH_SIZE


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


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def module_device(module: torch.nn.Module) -> str:
    """The device type (cuda, mps, cpu) of a module's first parameter."""
    return next(module.parameters()).device.type


# CUDA errors after which the context is unusable: the process must restart (the CUDA docs call them sticky).
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ECC error",
    "CUDA error: unknown error",
)


def is_device_lost(error: BaseException, device: str) -> bool:
    """True when ``error`` poisoned the CUDA context, so that nothing more can run on it in this process."""
    return device == "cuda" and isinstance(error, RuntimeError) and any(marker in str(error) for marker in STICKY_CUDA_ERRORS)


def free_memory(device: str) -> None:
    """Collect garbage, and return cached blocks to the driver on CUDA."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def allocated_bytes(device: str) -> int:
    """Device memory in use by tensors (0 off CUDA)."""
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def peak_allocated_bytes(device: str) -> int:
    """The most device memory tensors have held since start (0 off CUDA)."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``tensor`` copied to host memory without waiting for the device: from CUDA into pinned memory, with the event
    that marks the copy done; elsewhere at once (no event)."""
    if not tensor.is_cuda:
        return tensor.cpu(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def configure_memory_format(pipeline: StableDiffusionPipeline, device: str, settings: Settings) -> None:
    """UNet and VAE weights in channels_last (SD_CHANNELS_LAST; auto: on CUDA, where its convolutions run faster)."""
    if settings.channels_last == "on" or (settings.channels_last == "auto" and device == "cuda"):
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)


def configure_attention(pipeline: StableDiffusionPipeline, device: str, settings: Settings) -> None:
    """xformers on CUDA when installed and enabled (else PyTorch SDPA); attention slicing per setting."""
    if device == "cuda" and settings.enable_xformers:
        try:
            pipeline.enable_xformers_memory_efficient_attention()
        except Exception as error:  # xformers missing or built for another torch: SDPA stays.
            logger.info("xformers not used (%s); PyTorch SDPA attention runs", error)
    slicing = settings.attention_slicing
    if slicing == "on" or (slicing == "auto" and device == "mps"):
        pipeline.enable_attention_slicing()
