"""What the job queue may ask of an engine, in the spirit of LitServe's setup / batch / predict / encode: is a model
ready, prepare it, run a batch with a progress callback and a cancel check, encode the results, report memory."""

from collections.abc import Callable, Set
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol, TypedDict

from sd_server.domain.generation import Hires, Mode, SchedulerName
from sd_server.domain.models import LoraModel, UserModel
from sd_server.domain.trainings import TrainingSettings


@dataclass(frozen=True)
class BatchKey:
    """What jobs must share to run in one pipeline call: one base checkpoint, size, steps, CFG, sampler. Their
    adapters may differ: each image runs with its own job's LoRA."""

    base: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: SchedulerName | None
    mode: Mode = Mode.txt2img
    strength: float = 1.0
    prompt_chunks: int = 1  # 77-token chunks of every prompt embedding (long prompts take more)
    hires: Hires | None = None  # hires fix: an upscale and an img2img pass after the first


@dataclass(frozen=True)
class ImageSource:
    """What an img2img or inpainting item starts from: PNGs at the output size (white in the mask = repaint), the
    mask's blur, and whether to inpaint only the masked area at full resolution (with padding around it)."""

    init_png: bytes
    mask_png: bytes | None = None
    mask_blur: int = 4
    full_res: bool = False
    full_res_padding: int = 32


@dataclass(frozen=True)
class BatchItem:
    """One job's share of a batch: its model (the key's base, or a LoRA on it), its prompts, and the seed of its
    first image (image i has seed + i)."""

    model: UserModel
    prompt: str
    negative_prompt: str | None
    seed: int
    num_images: int
    source: ImageSource | None = None


@dataclass
class BatchOutput:
    """What a batch made: each item's images (the engine's own image objects, for ``encode``), and the scheduler that
    ran (a SchedulerName value, or the model's own scheduler class name)."""

    images: list[list[Any]]
    scheduler: str


class EngineReport(TypedDict):
    """What an engine runs on and holds now, for /health, /models and the metrics."""

    device: str
    dtype: str
    loaded_models: list[str]
    cache: dict[str, Any]
    device_memory_bytes: int
    device_memory_peak_bytes: int
    compile: dict[str, Any]


class Stop(IntEnum):
    """What the queue answers after a step: go on, stop and discard the batch (its jobs were cancelled), or finish
    now and decode what the steps so far made (A1111's interrupt). False is ``go``."""

    go = 0
    discard = 1
    finish = 2


class StepCallback(Protocol):
    """Told after each denoising step: the step, the steps in all, and on preview steps one JPEG per image (the
    items' images in order)."""

    def __call__(self, step: int, total: int, previews: list[bytes] | None = None) -> None: ...


class TrainingRun(Protocol):
    """One training on the device, run a few steps at a time by the device worker between batches."""

    step: int

    def prepare(self) -> bool:
        """Do the next piece of what must come before the first step (drawing a few class pictures for prior
        preservation), about a slice's worth; True once nothing is left."""
        ...

    def run(self, steps: int) -> float:
        """Train ``steps`` more steps; their mean loss (TrainingFailedError when it stops being a number)."""
        ...

    def save_checkpoint(self, path: Path) -> None:
        """Write the whole training state (adapter, optimizer, step, random generator) to ``path``."""
        ...

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a state ``save_checkpoint`` wrote."""
        ...

    def export(self, path: Path) -> None:
        """Save the adapter as a LoRA file in diffusers' format."""
        ...

    def samples(self, prompts: list[str]) -> list[Any]:
        """Images of ``prompts`` drawn with the adapter (the engine's image objects, for ``encode``)."""
        ...


class Engine(Protocol):
    """An engine behind the job queue. Its methods are called from the queue's worker threads (and, for uploads
    and unloads, from request threads), never from the event loop."""

    device: str
    default_max_batch_size: int
    parallel_batches: int  # batches that may run at once: one per device thread of the queue

    def is_ready(self, model: UserModel) -> bool:
        """True when a batch for ``model`` can start now."""
        ...

    def prompt_chunks(self, base: str, texts: list[str]) -> int:
        """How many 75-token chunks the longest of ``texts`` takes with ``base``'s tokenizer (jobs batch by it)."""
        ...

    def needs_loading(self, model: UserModel) -> bool:
        """True when ``prepare(model)`` has work to do."""
        ...

    def prepare(self, model: UserModel, keep: Set[str] = frozenset()) -> bool:
        """Make ``model`` ready, moving out nothing in ``keep`` (checkpoint sources); False: no room now."""
        ...

    def run_batch(self, key: BatchKey, items: list[BatchItem], on_step: StepCallback, should_stop: Callable[[], Stop]) -> BatchOutput | None:
        """One call for all items, each image with its own item's adapter; ``on_step(step, total, previews)`` after
        each denoising step (every SD_PREVIEW_EVERY steps with a JPEG preview of each image). After a step,
        ``should_stop()``: ``discard`` ends the call with None; ``finish`` decodes the images as they are (an engine
        that cannot may answer None)."""
        ...

    def encode(self, images: list[Any], texts: list[str]) -> list[bytes]:
        """Each image as PNG bytes, with its text as the PNG ``parameters`` chunk."""
        ...

    def free_memory(self) -> None:
        """Give back memory that nothing holds (after a failure, say)."""
        ...

    def report(self) -> EngineReport:
        """Device, dtype, models in memory, cache figures and device memory now."""
        ...

    def loaded_models(self) -> list[str]:
        """Checkpoints in memory, least recently used first."""
        ...

    def unload(self, source: str | None = None) -> list[str]:
        """Drop one checkpoint (or all) from memory; returns those dropped."""
        ...

    def close(self) -> None:
        """At shutdown, after the last batch: give back what the engine holds."""
        ...

    def unload_adapter(self, model: LoraModel) -> bool:
        """Take ``model``'s LoRA off its base; True when it was loaded."""
        ...

    def check_adapter(self, base: str, path: Path) -> None:
        """Raise InvalidAdapterError unless the LoRA file at ``path`` loads onto ``base``."""
        ...

    def start_training(self, base: str, photos: list[Path], settings: TrainingSettings) -> TrainingRun:
        """Load ``base`` for training and encode the prepared ``photos``: a training at step 0 (device thread)."""
        ...
