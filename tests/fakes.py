"""A fake engine: the Engine interface in a few lines, no torch. Models load at once (or fail, or wait for a
gate); a batch is a loop of steps that a test can hold at a gate; an image is a small picture coloured by its seed."""

import io
import threading
from collections.abc import Callable, Set
from pathlib import Path

from PIL import Image

from sd_server.domain.models import LoraModel, UserModel
from sd_server.domain.trainings import TrainingSettings
from sd_server.engine.interface import BatchItem, BatchKey, BatchOutput, EngineReport, StepCallback, Stop
from sd_server.engine.png import encode_png

GATE_TIMEOUT_S = 60  # a gate a test forgot to open lets the worker go on after this, so nothing hangs


def empty_cache_report() -> dict:
    """A cache report with nothing in it, in the shape /health shows."""
    tier = {"models": [], "bytes": 0, "budget_bytes": 0, "hits": 0, "misses": 0, "evictions": 0, "load_seconds": 0.0}
    adapters = {"resident": [], "bytes": 0, "max_adapters": 0, "hits": 0, "misses": 0, "evictions": 0, "load_seconds": 0.0}
    return {"device": tier, "cpu": dict(tier), "adapters": adapters, "shared_components": 0}


class FakeEngine:
    """Records every batch it runs; ``step_gate`` (when set) makes each step wait for a release, ``load_gate`` each
    load, ``encode_gate`` each encoding; ``broken`` maps a checkpoint to the error its load raises; ``failures``,
    ``encode_failures`` and ``readiness_failures`` are raised by the next batches, encodings and readiness checks.
    Trainings count their steps: ``slice_gate`` holds each slice, ``samples_gate`` the samples a training draws after
    its last step (``samples_drawn`` is set as they start); a training's preparation takes ``preparation_pieces``
    more slices (``prepare_gate`` holds each). With ``preview_every``, every that many steps each image
    has a preview: its seed's colour as an 8x8 JPEG."""

    device = "cpu"
    default_max_batch_size = 4
    parallel_batches = 1

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.broken: dict[str, Exception] = {}
        self.failures: list[Exception] = []
        self.batches: list[tuple[BatchKey, list[BatchItem]]] = []
        self.step_gate: threading.Semaphore | None = None
        self.load_gate: threading.Event | None = None
        self.encode_gate: threading.Event | None = None
        self.encode_failures: list[Exception] = []
        self.readiness_failures: list[Exception] = []
        self.slice_gate: threading.Semaphore | None = None
        self.samples_gate: threading.Event | None = None
        self.preparation_pieces = 0  # calls of a training's prepare() that leave something to do (class pictures)
        self.prepared_pieces = 0
        self.prepare_gate: threading.Semaphore | None = None
        self.samples_drawn = threading.Event()
        self.preview_every = 0

    def is_ready(self, model: UserModel) -> bool:
        if self.readiness_failures:
            raise self.readiness_failures.pop(0)
        return model.base in self.loaded

    def needs_loading(self, model: UserModel) -> bool:
        return not self.is_ready(model)

    def prompt_chunks(self, base: str, texts: list[str]) -> int:
        return max(1, *(len(text.split()) // 75 + 1 for text in texts))

    def prepare(self, model: UserModel, keep: Set[str] = frozenset()) -> bool:
        if model.base in self.broken:
            raise self.broken[model.base]
        if self.load_gate is not None:
            self.load_gate.wait(GATE_TIMEOUT_S)
        self.loaded.add(model.base)
        return True

    def run_batch(
        self, key: BatchKey, items: list[BatchItem], on_step: StepCallback, should_stop: Callable[[], Stop]
    ) -> BatchOutput | None:
        self.batches.append((key, items))
        if self.failures:
            raise self.failures.pop(0)
        total = min(int(key.num_inference_steps * key.strength), key.num_inference_steps)  # img2img skips the first steps
        total += key.hires.steps_to_run(key.num_inference_steps) if key.hires else 0  # and hires fix's pass
        for step in range(1, total + 1):
            if self.step_gate is not None:
                self.step_gate.acquire(timeout=GATE_TIMEOUT_S)
            on_step(step, total, self._previews(items) if self.preview_every and step % self.preview_every == 0 else None)
            stop = should_stop()
            if stop == Stop.discard:
                return None
            if stop == Stop.finish:
                break
        images = [[seed_image(item.seed + index) for index in range(item.num_images)] for item in items]
        return BatchOutput(images, key.scheduler.value if key.scheduler else "pndm")

    def _previews(self, items: list[BatchItem]) -> list[bytes]:
        """A JPEG of each image's seed colour."""
        jpegs = []
        for item in items:
            for index in range(item.num_images):
                buffer = io.BytesIO()
                seed_image(item.seed + index).save(buffer, "JPEG")
                jpegs.append(buffer.getvalue())
        return jpegs

    def encode(self, images: list[Image.Image], texts: list[str]) -> list[bytes]:
        if self.encode_gate is not None:
            self.encode_gate.wait(GATE_TIMEOUT_S)
        if self.encode_failures:
            raise self.encode_failures.pop(0)
        return [encode_png(image, text) for image, text in zip(images, texts)]

    def free_memory(self) -> None:
        pass

    def report(self) -> EngineReport:
        return EngineReport(
            device="cpu",
            dtype="float32",
            loaded_models=self.loaded_models(),
            cache=empty_cache_report(),
            device_memory_bytes=0,
            device_memory_peak_bytes=0,
            compile={"enabled": False},
        )

    def loaded_models(self) -> list[str]:
        return sorted(self.loaded)

    def unload(self, source: str | None = None) -> list[str]:
        dropped = [name for name in self.loaded_models() if source in (None, name)]
        self.loaded -= set(dropped)
        return dropped

    def close(self) -> None:
        self.unload()

    def unload_adapter(self, model: LoraModel) -> bool:
        return False

    def check_adapter(self, base: str, path: Path) -> None:
        pass

    def start_training(self, base: str, photos: list[Path], settings: TrainingSettings) -> "FakeTrainingRun":
        if base in self.broken:
            raise self.broken[base]
        return FakeTrainingRun(self, len(photos))

    def batch_sizes(self) -> list[int]:
        """Images per batch run so far, in order."""
        return [sum(item.num_images for item in items) for _, items in self.batches]


def seed_image(seed: int) -> Image.Image:
    """An 8x8 picture whose colour is a function of ``seed``."""
    return Image.new("RGB", (8, 8), (seed % 256, (seed // 256) % 256, 128))


class FakeTrainingRun:
    """A training that counts steps; its checkpoint is the step, its LoRA a few bytes naming its photos."""

    def __init__(self, engine: FakeEngine, photos: int) -> None:
        self.engine, self.photos, self.step = engine, photos, 0

    def prepare(self) -> bool:
        if self.engine.prepare_gate is not None:
            self.engine.prepare_gate.acquire(timeout=GATE_TIMEOUT_S)
        self.engine.prepared_pieces += 1
        return self.engine.prepared_pieces > self.engine.preparation_pieces

    def run(self, steps: int) -> float:
        if self.engine.slice_gate is not None:
            self.engine.slice_gate.acquire(timeout=GATE_TIMEOUT_S)
        self.step += steps
        return 1.0 / self.step

    def save_checkpoint(self, path: Path) -> None:
        path.write_text(str(self.step))

    def load_checkpoint(self, path: Path) -> None:
        self.step = int(path.read_text())

    def export(self, path: Path) -> None:
        path.write_bytes(f"fake adapter of {self.photos} photos".encode())

    def samples(self, prompts: list[str]) -> list[Image.Image]:
        self.engine.samples_drawn.set()
        if self.engine.samples_gate is not None:
            self.engine.samples_gate.wait(GATE_TIMEOUT_S)
        return [seed_image(index) for index in range(len(prompts))]

