"""A LoRA training under SD_ENGINE=ray: the trainer lives in a Ray actor of its own, with a replica's devices, and
the trainings service drives it a slice of steps at a time, as it drives the local one. Paths (photos, checkpoints,
the exported LoRA) are on the file system the replicas share with this process."""

from pathlib import Path

import ray
import torch

from config import Settings
from sd_server.domain.trainings import TrainingSettings
from sd_server.engine import devices
from sd_server.engine.lora_training import LoraTrainer, start_training
from sd_server.engine.png import encode_png
from sd_server.errors import ServiceUnavailableError, TrainingFailedError, first_line

START_TIMEOUT_S = 600  # how long a training waits for the cluster to have a device free for it


class TrainingHost:
    """Holds one LoraTrainer on the device of the process Ray started it in (a Ray actor: TrainingActor)."""

    def start(self, device: str, models_dir: str, base: str, photos: list[str], settings: TrainingSettings) -> None:
        """Load ``base`` and encode the photos (an error here reaches the caller as itself, not as a dead actor)."""
        device = devices.choose_device(device, torch.cuda.is_available(), torch.backends.mps.is_available())
        self.trainer: LoraTrainer = start_training(Path(models_dir), base, [Path(photo) for photo in photos], settings, device)

    def prepare(self) -> bool:
        """The next piece of the preparation (LoraTrainer.prepare); True when ready to train."""
        return self.trainer.prepare()

    def run(self, steps: int) -> tuple[float, int]:
        """Train ``steps`` steps: their mean loss, and the step reached."""
        return self.trainer.run(steps), self.trainer.step

    def save_checkpoint(self, path: str) -> None:
        """Write the training state to ``path``."""
        self.trainer.save_checkpoint(Path(path))

    def load_checkpoint(self, path: str) -> int:
        """Continue from the state at ``path``: the step it had reached."""
        self.trainer.load_checkpoint(Path(path))
        return self.trainer.step

    def export(self, path: str) -> None:
        """Save the adapter as a LoRA file."""
        self.trainer.export(Path(path))

    def samples(self, prompts: list[str]) -> list[bytes]:
        """Images of ``prompts`` drawn with the adapter, as PNGs (the Ray engine's images)."""
        return [encode_png(image) for image in self.trainer.samples(prompts)]


TrainingActor = ray.remote(TrainingHost)  # the class stays importable by name, so Ray ships a reference, not its code


class RemoteTraining:
    """A TrainingRun whose every call is a call on its actor; the actor ends with this object."""

    def __init__(self, settings: Settings, num_gpus: float, base: str, photos: list[Path], training: TrainingSettings) -> None:
        # On CPU replicas the training shares their cores instead of waiting for one to be free.
        options = {"num_gpus": num_gpus, "num_cpus": settings.ray_num_cpus if num_gpus else 0}
        self.actor = TrainingActor.options(**options).remote()
        self.step = 0
        try:
            ray.get(self.actor.__ray_ready__.remote(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as error:
            ray.kill(self.actor)
            raise ServiceUnavailableError(
                f"no device of the Ray cluster was free for a training within {START_TIMEOUT_S} s; add a node with a GPU, "
                "or lower SD_RAY_REPLICAS",
            ) from error
        photo_paths = [str(photo.resolve()) for photo in photos]
        self._get(self.actor.start.remote(settings.device, str(settings.models_dir.resolve()), base, photo_paths, training))

    def prepare(self) -> bool:
        """The next piece of the preparation, on the actor; True when ready to train."""
        return bool(self._get(self.actor.prepare.remote()))

    def run(self, steps: int) -> float:
        """Train ``steps`` more steps on the actor; their mean loss."""
        loss, self.step = self._get(self.actor.run.remote(steps))
        return loss

    def save_checkpoint(self, path: Path) -> None:
        """Write the whole training state to ``path``."""
        self._get(self.actor.save_checkpoint.remote(str(path.resolve())))

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a state ``save_checkpoint`` wrote."""
        self.step = self._get(self.actor.load_checkpoint.remote(str(path.resolve())))

    def export(self, path: Path) -> None:
        """Save the adapter as a LoRA file in diffusers' format."""
        self._get(self.actor.export.remote(str(path.resolve())))

    def samples(self, prompts: list[str]) -> list[bytes]:
        """Images of ``prompts`` drawn with the adapter, as PNGs (RayEngine.encode adds their parameters)."""
        return self._get(self.actor.samples.remote(prompts))

    def _get(self, reference: ray.ObjectRef):
        """The call's result; the actor's own error (TrainingFailedError, say) raised as itself."""
        try:
            return ray.get(reference)
        except ray.exceptions.RayTaskError as error:
            raise (error.cause if isinstance(error.cause, Exception) else error) from None
        except ray.exceptions.RayActorError as error:
            raise TrainingFailedError("the Ray actor running the training died; the Ray logs say why", detail=first_line(error)) from error
