"""Trainings of users' own LoRAs. Requests submit, cancel and delete them here; the device worker runs them a slice
of a few steps at a time between generation batches (``run_slice``), so a generation waits at most one slice.
Each training lives in the database and in a folder of its own (its prepared photos and its last checkpoint): after
a crash it resumes from that checkpoint; a second crash before the next checkpoint fails it."""

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from PIL.Image import Image

from config import Settings
from sd_server.domain.jobs import utc_now
from sd_server.domain.models import LoraModel
from sd_server.domain.trainings import Training, TrainingSettings, TrainingStatus
from sd_server.engine.interface import Engine, TrainingRun
from sd_server.errors import JobFinishedError, ServiceError, TrainingFailedError, TrainingLimitError, summary
from sd_server.jobs import admission
from sd_server.jobs.events import JobEvents
from sd_server.jobs.model_changes import unload_if_unused
from sd_server.observability.liveness import Liveness, PartState
from sd_server.persistence.training_store import SqlTrainingStore
from sd_server.registry import ModelRegistry
from sd_server.storage.images import ImageStorage
from sd_server.storage.model_files import STAGING_FOLDER, keep_upload
from sd_server.storage.photos import photo_paths, save_photos

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def sample_key(training: Training, index: int) -> str:
    """The storage key of a training's sample image ``index``."""
    return f"training-{training.id}-{index}.png"


class Trainings:
    """Active trainings in submission order, the device's runs of them, and their records in the database."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: ModelRegistry,
        store: SqlTrainingStore,
        storage: ImageStorage,
        events: JobEvents,
        liveness: Liveness,
    ) -> None:
        self.settings, self.engine, self.registry, self.store, self.storage = settings, engine, registry, store, storage
        self.events, self.liveness = events, liveness
        self.folder = settings.data_dir / "trainings"
        self.terminal_hook: Callable[[Training], None] | None = None  # the webhook, set by the composition root
        self.wake_device: Callable[[], None] = lambda: None
        self._active: list[Training] = []
        self._admitting: list[Training] = []  # admitted, their photos and record being written
        self._runs: dict[str, TrainingRun] = {}
        self._lock = threading.Lock()

    # --- requests ------------------------------------------------------------------------------------

    def submit(
        self,
        user_id: str,
        settings: TrainingSettings,
        photos: list[Image],
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[Training, bool]:
        """Keep the prepared photos and queue a training on the user's base (the base of their LoRA, or their
        checkpoint); returns it and whether it is new (False: an idempotent repeat). 429 while the user has one."""
        training = Training(
            user_id=user_id,
            base=self.registry.base_for_training(user_id),
            settings=settings,
            photo_count=len(photos),
            webhook_url=webhook_url,
            idempotency_key=admission.scoped_key(user_id, idempotency_key),
            fingerprint=fingerprint(settings, photos, webhook_url),
            request_id=request_id,
        )
        if training.idempotency_key and (existing := self.store.find_by_idempotency_key(training.idempotency_key)):
            admission.check_repeat(training, existing, idempotency_key or "")
            return self.live(existing.id) or existing, False
        with self._lock:
            running = next((other for other in self._active + self._admitting if other.user_id == user_id), None)
            if running is not None:
                raise TrainingLimitError(
                    f"user '{user_id}' already has training {running.id} {running.status.value}; one at a time "
                    f"(cancel it with POST /trainings/{running.id}/cancel)",
                    max(1, int(running.eta_s or 60)),
                )
            self._admitting.append(training)  # holds the user's place while the photos are written
        stored = None
        try:
            save_photos(photos, self.folder / training.id / "photos")
            stored = self.store.add(training)
        finally:
            with self._lock:
                self._admitting.remove(training)
                if stored is training:
                    self._active.append(training)
            if stored is not training:  # failed, or a racing repeat of the same key stored first
                shutil.rmtree(self.folder / training.id, ignore_errors=True)
        if stored is not training:
            admission.check_repeat(training, stored, idempotency_key or "")
            return stored, False
        self.events.emit(training, "queued")
        self.wake_device()
        return training, True

    def live(self, training_id: str) -> Training | None:
        """The live training, while it is active (its progress is not stored at every slice)."""
        with self._lock:
            return next((training for training in self._active if training.id == training_id), None)

    def get(self, training_id: str) -> Training | None:
        """The live training when it is active, else its record; None when there is none."""
        return self.live(training_id) or self.store.get(training_id)

    def cancel(self, training: Training) -> None:
        """Cancel: a queued training ends now, a running one at the end of its slice; 409 once ended."""
        with self._lock:
            if training.status.is_terminal:
                raise JobFinishedError(f"training {training.id} has already {training.status.value}")
            training.cancel_requested = True
            ends_now = training.status is TrainingStatus.queued  # not claimed by the device worker (run_slice)
            if ends_now and training in self._active:
                self._active.remove(training)
        if ends_now:
            self._end(training, TrainingStatus.cancelled)

    def delete(self, training: Training) -> None:
        """Cancel the training if it is active, then delete its samples, its files and its record (the LoRA it
        produced stays: it may be the user's model)."""
        training.deleted = True
        if not training.status.is_terminal:
            try:
                self.cancel(training)
            except JobFinishedError:
                pass  # it ended meanwhile
        for key in training.samples:
            self.storage.delete(key)
        self.store.delete(training.id)  # its folder went when it ended (``_end``)

    # --- start ---------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Queue again what the last run left active: a training resumes from its last checkpoint; one that already
        restarted from that checkpoint once (so crashed twice at the same point) fails."""
        for training in self.store.unfinished():
            if training.status is not TrainingStatus.queued and training.attempts >= 1:
                self._end(training, TrainingStatus.failed, TrainingFailedError(
                    f"the server stopped twice while this training ran from step {training.checkpoint_step}; train again"
                ))  # fmt: skip
                continue
            if training.status is not TrainingStatus.queued:
                training.attempts += 1
                training.status, training.step = TrainingStatus.queued, training.checkpoint_step
                self.store.save(training)
            with self._lock:
                self._active.append(training)
        if self._active:
            logger.info("resuming %d unfinished trainings from their last checkpoints", len(self._active))

    def suspend(self) -> None:
        """At shutdown, with the device stopped: checkpoint each running training where it is and leave it queued,
        to resume there after the restart (a clean stop is not a crash)."""
        for training_id, run in list(self._runs.items()):
            training = self.live(training_id)
            if training is None or training.status.is_terminal:
                continue
            run.save_checkpoint(self.folder / training.id / CHECKPOINT)
            training.status, training.checkpoint_step, training.attempts = TrainingStatus.queued, run.step, 0
            self.store.save(training)
        self._runs.clear()

    # --- for the device worker -----------------------------------------------------------------------

    def has_work(self) -> bool:
        """True when a training waits for the device."""
        with self._lock:
            return bool(self._active)

    def run_slice(self) -> None:
        """Advance the first active training by one slice (or prepare it); a failure fails that training only."""
        with self._lock:
            training = self._active[0] if self._active else None
            if training is not None and training.status is TrainingStatus.queued:
                training.status = TrainingStatus.preparing  # claimed: from now on a cancel waits for the slice
        if training is None:
            return
        try:
            self._advance(training)
            self.liveness.set("trainer", PartState.ok)
        except Exception as error:
            failure = error if isinstance(error, ServiceError) else TrainingFailedError(
                f"the training failed; the server log has the details (request id {training.request_id or training.id})"
            )  # fmt: skip
            logger.error("training %s failed: %s", training.id, failure.message, exc_info=error, extra={"request_id": training.request_id})
            self.liveness.set("trainer", PartState.failing, summary(error))
            self._end(training, TrainingStatus.failed, failure)
            self.engine.free_memory()

    def _advance(self, training: Training) -> None:
        """Prepare the training's run, or train one slice; checkpoint, and finish at the last step."""
        if training.cancel_requested:
            self._end(training, TrainingStatus.cancelled)
            return
        run = self._runs.get(training.id)
        if run is None:
            self._prepare(training)
            return
        started = time.monotonic()
        steps = min(self.settings.training_slice_steps, training.settings.steps - run.step)
        training.loss = round(run.run(steps), 6)
        training.step = run.step
        pace = (time.monotonic() - started) / steps
        training.seconds_per_step = round(pace if training.seconds_per_step is None else 0.8 * training.seconds_per_step + 0.2 * pace, 4)
        self.events.emit(training, "progress", progress(training))
        if training.step >= training.settings.steps:
            self._finish(training, run)
        elif training.step - training.checkpoint_step >= self.settings.training_checkpoint_every:
            run.save_checkpoint(self.folder / training.id / CHECKPOINT)
            training.checkpoint_step, training.attempts = training.step, 0
            self.store.save(training)

    def _prepare(self, training: Training) -> None:
        """Load the base and encode the photos; continue from the checkpoint a crash left, if any."""
        training.started_at = training.started_at or utc_now()
        self._announce(training)
        folder = self.folder / training.id
        run = self.engine.start_training(training.base, photo_paths(folder / "photos"), training.settings)
        if (folder / CHECKPOINT).exists():
            run.load_checkpoint(folder / CHECKPOINT)
            logger.info("training %s resumes from step %d", training.id, run.step, extra={"request_id": training.request_id})
        training.step = training.checkpoint_step = run.step
        self._runs[training.id] = run
        training.status = TrainingStatus.training
        self._announce(training)

    def _finish(self, training: Training, run: TrainingRun) -> None:
        """Keep the LoRA under its content hash, draw and store the samples, make it the user's model (``activate``)."""
        staged = self.settings.models_dir / STAGING_FOLDER / f"training-{training.id}.safetensors"
        staged.parent.mkdir(parents=True, exist_ok=True)
        run.export(staged)
        source = keep_upload(staged, hashlib.sha256(staged.read_bytes()).hexdigest(), self.settings.models_dir)
        model = LoraModel(base=training.base, source=source, scale=1.0)
        prompts = training.settings.sample_prompts
        pngs = self.engine.encode(run.samples(prompts), prompts)
        training.samples = [sample_key(training, index) for index in range(len(pngs))]
        for key, png in zip(training.samples, pngs):
            self.storage.put(key, png)
        training.model = model
        if training.settings.activate and not training.deleted:
            previous = self.registry.set(training.user_id, model)
            unload_if_unused(previous, self.registry, self.engine)
        self._end(training, TrainingStatus.succeeded)

    # --- shared --------------------------------------------------------------------------------------

    def _end(self, training: Training, status: TrainingStatus, error: ServiceError | None = None) -> None:
        """Drop its files, move the training to a terminal state, store it, and tell its followers and webhook."""
        self._runs.pop(training.id, None)
        # The photos and checkpoint, no longer needed, go first: whoever sees the training ended finds them gone.
        shutil.rmtree(self.folder / training.id, ignore_errors=True)
        training.status, training.finished_at = status, utc_now()
        training.error, training.error_status = (error.message, error.status_code) if error else (None, None)
        self._drop(training)
        if training.deleted:
            self.events.emit(training, training.status.value)  # its followers learn that it ended; its record is gone
            return
        self._announce(training)
        if training.webhook_url and self.terminal_hook:
            self.terminal_hook(training)

    def _announce(self, training: Training) -> None:
        """Store the training's state and send it to its followers."""
        self.store.save(training)
        self.events.emit(training, training.status.value)

    def _drop(self, training: Training) -> None:
        with self._lock:
            if training in self._active:
                self._active.remove(training)


def progress(training: Training) -> dict:
    """A training's progress, as its events and its JSON show it."""
    return {"step": training.step, "total": training.settings.steps, "loss": training.loss, "eta_s": training.eta_s}


def fingerprint(settings: TrainingSettings, photos: list[Image], webhook_url: str | None) -> str:
    """What makes two submissions the same: the settings, the webhook and the photos' pixels."""
    digest = hashlib.sha256(json.dumps([asdict(settings), webhook_url]).encode())
    for photo in photos:
        digest.update(photo.tobytes())
    return digest.hexdigest()

