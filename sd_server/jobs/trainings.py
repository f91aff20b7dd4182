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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL.Image import Image

from config import Settings
from sd_server.domain.jobs import utc_now
from sd_server.domain.lifecycle import transition
from sd_server.domain.models import LoraModel
from sd_server.domain.trainings import Training, TrainingSettings, TrainingStatus, TrainingStore
from sd_server.engine.interface import Engine, TrainingRun
from sd_server.errors import (
    DatabaseUnavailableError,
    JobFinishedError,
    ServiceError,
    TrainingFailedError,
    TrainingLimitError,
    summary,
)
from sd_server.jobs import admission
from sd_server.jobs.events import EventBus
from sd_server.jobs.model_changes import unload_if_unused
from sd_server.jobs.recovery import Restart, on_restart
from sd_server.jobs.writer import Writer
from sd_server.observability.liveness import Liveness, PartState
from sd_server.registry import ModelRegistry
from sd_server.storage.images import ImageStorage
from sd_server.storage.model_files import STAGING_FOLDER, keep_upload
from sd_server.storage.photos import photo_paths, save_photos

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
DATABASE_PAUSE_S = 5.0  # how long the trainer leaves the device to generation after the database failed it


@dataclass
class Reservation:
    """A user's one place for a training, held while their upload is read and checked (``Trainings.reservation``)."""

    user_id: str
    held: bool = True


@dataclass
class TrainedOutput:
    """What a training that ran its last step made, kept until it is committed: the staged LoRA file, the samples
    stored, and (once kept under its hash) the model."""

    staged: Path
    samples: list[str] = field(default_factory=list)
    model: LoraModel | None = None


SampleScorer = Callable[[list[Path], list[Any], TrainingSettings], dict[str, Any]]  # (photos, samples, settings) -> scores


def sample_key(training: Training, index: int, step: int | None = None) -> str:
    """The storage key of a training's sample image ``index``: of the trained model, or as it was at ``step``."""
    return f"training-{training.id}-{index}.png" if step is None else f"training-{training.id}-step{step}-{index}.png"


class Trainings:
    """Active trainings in submission order, the device's runs of them, and their records in the database."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: ModelRegistry,
        store: TrainingStore,
        storage: ImageStorage,
        writer: Writer,
        bus: EventBus,
        liveness: Liveness,
        wake_device: Callable[[], None],
        evaluators: Mapping[str, SampleScorer] | None = None,
    ) -> None:
        """``evaluators``: by name, what scores a training's samples when its base's recipe names one."""
        self.settings, self.engine, self.registry, self.store, self.storage = settings, engine, registry, store, storage
        self.evaluators = dict(evaluators or {})
        self.writer, self.bus, self.liveness, self.wake_device = writer, bus, liveness, wake_device
        self.folder = settings.data_dir / "trainings"
        liveness.register("trainer")
        self._active: list[Training] = []
        self._reserved: set[str] = set()  # users whose upload is being read and checked
        self._runs: dict[str, TrainingRun] = {}
        self._outputs: dict[str, TrainedOutput] = {}
        self._paused_until = 0.0  # the database failed the last slice: generation has the device until then
        self._lock = threading.Lock()

    # --- requests ------------------------------------------------------------------------------------

    def check_room(self, user_id: str) -> None:
        """429 while the user has a training queued, running, or being uploaded (one at a time)."""
        with self._lock:
            self._check_room(user_id)

    @contextmanager
    def reservation(self, user_id: str) -> Iterator[Reservation]:
        """Hold the user's one place while their upload is unpacked, checked and decoded (429 when it is taken), so
        that a user who sends several at once has the others refused before any is decoded."""
        with self._lock:
            self._check_room(user_id)
            self._reserved.add(user_id)
        reservation = Reservation(user_id)
        try:
            yield reservation
        finally:
            with self._lock:
                reservation.held = False
                self._reserved.discard(user_id)

    def base_for(self, user_id: str) -> str:
        """The checkpoint a new LoRA of ``user_id`` trains on: the base of their model, else the fallback's, else
        the default user's (404 when there is none)."""
        return self.registry.base_for_training(user_id)

    def repeat_of(self, user_id: str, idempotency_key: str | None, fingerprint: str) -> Training | None:
        """The training an earlier request with this Idempotency-Key made (409 when its body differed), else None."""
        scoped = admission.scoped_key(user_id, idempotency_key)
        existing = self.store.find_by_idempotency_key(scoped) if scoped else None
        if existing is None:
            return None
        admission.check_repeat(fingerprint, existing, idempotency_key or "")
        return self.writer.live(existing)

    def submit(
        self,
        reservation: Reservation,
        base: str,
        settings: TrainingSettings,
        photos: list[Image],
        fingerprint: str,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        key_id: str | None = None,
        warnings: list[str] | None = None,
    ) -> tuple[Training, bool]:
        """Keep the prepared photos and queue a training on ``base`` (``base_for``), in the place ``reservation``
        holds; returns it and whether it is new (False: a racing repeat of the same Idempotency-Key, on another
        replica, stored first)."""
        assert reservation.held, "submit within Trainings.reservation()"
        user_id = reservation.user_id
        training = Training(
            user_id=user_id,
            base=base,
            settings=settings,
            warnings=warnings or [],
            photo_count=len(photos),
            webhook_url=webhook_url,
            key_id=key_id,
            idempotency_key=admission.scoped_key(user_id, idempotency_key),
            fingerprint=fingerprint,
            request_id=request_id,
        )
        stored = None
        try:
            save_photos(photos, self.folder / training.id / "photos")
            stored = self.store.add(training)
        finally:
            if stored is not training:  # failed, or a racing repeat of the same key stored first
                shutil.rmtree(self.folder / training.id, ignore_errors=True)
        if stored is not training:
            admission.check_repeat(fingerprint, stored, idempotency_key or "")
            return stored, False
        self.writer.track([training])
        with self._lock:
            self._active.append(training)
        self.bus.emit(training, "queued")
        self.wake_device()
        return training, True

    def live(self, training_id: str) -> Training | None:
        """The live training, while it is active (its progress is not stored at every slice)."""
        with self._lock:
            return next((training for training in self._active if training.id == training_id), None)

    def get(self, training_id: str) -> Training | None:
        """The live training when it is active (or its last state is not stored yet), else its record; None when
        there is none, or it was deleted."""
        live = self.writer.current(training_id)
        training = live if isinstance(live, Training) else self.store.get(training_id)
        return None if training is None or training.deleted else training

    def page(self, user_id: str | None, limit: int, offset: int) -> tuple[list[Training], int]:
        """A page of trainings, newest first (one user's, or everyone's), each the live record while active."""
        trainings, total = self.store.page(user_id, limit, offset)
        return [self.writer.live(training) for training in trainings], total

    def cancel(self, training: Training) -> None:
        """Cancel: a queued training ends now, a running one at the end of its slice; 409 once ended."""
        with self._lock:
            if training.status.is_terminal:
                raise JobFinishedError(f"training {training.id} has already {training.status.value}")
            if training.committed:
                raise JobFinishedError(f"training {training.id} has run its last step; its model is being stored")
            training.cancel_requested = True
            ends_now = training.status is TrainingStatus.queued  # not claimed by the device worker (run_slice)
            if ends_now and training in self._active:
                self._active.remove(training)
        if ends_now:
            self._end(training, TrainingStatus.cancelled)

    def delete(self, training: Training) -> None:
        """Cancel the training if it is active, then delete its samples, its files and its record (the LoRA it
        produced stays: it may be the user's model). A training cancelled here removes the samples it was drawing
        as it ends; one past its commit has stored them all already."""
        training.deleted = True
        if not training.status.is_terminal:
            with suppress(JobFinishedError):  # it ended, or committed, meanwhile
                self.cancel(training)
        for key in [*training.samples, *training.progress_sample_keys]:
            self.storage.delete(key)
        self.store.delete(training.id)  # its folder went when it ended (``_end``)
        self.writer.forget(training.id)

    # --- start ---------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Queue again what the last run left active: a training resumes from its last checkpoint; one that already
        restarted from that checkpoint once (so crashed twice at the same point) fails."""
        unfinished = self.store.unfinished()
        self.writer.track(unfinished)
        for training in unfinished:
            restart = on_restart(training.status.phase, training.attempts)
            if restart is Restart.fail:
                self._end(training, TrainingStatus.failed, TrainingFailedError(
                    f"the server stopped twice while this training ran from step {training.checkpoint_step}; train again"
                ))  # fmt: skip
                continue
            if restart is Restart.retry:
                transition(training, TrainingStatus.queued)
                training.attempts, training.step = training.attempts + 1, training.checkpoint_step
                self.writer.persist([training])
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
            transition(training, TrainingStatus.queued)
            training.checkpoint_step, training.attempts = run.step, 0
            self.writer.persist([training])
        self._runs.clear()

    # --- for the device worker -----------------------------------------------------------------------

    def has_work(self) -> bool:
        """True when a training waits for the device (and the database did not just fail one)."""
        with self._lock:
            return bool(self._active) and time.monotonic() >= self._paused_until

    def run_slice(self) -> None:
        """Advance the first active training by one slice (or prepare or finish it). A database that is away pauses
        it, its steps kept, and generation has the device meanwhile; any other failure fails that training only."""
        self.writer.flush()
        with self._lock:
            training = self._active[0] if self._active else None
            if training is not None and training.status is TrainingStatus.queued:
                transition(training, TrainingStatus.preparing)  # claimed: from now on a cancel waits for the slice
        if training is None:
            return
        try:
            self._advance(training)
            self.liveness.set("trainer", PartState.ok)
        except DatabaseUnavailableError as error:
            logger.warning("training %s waits for the database: %s", training.id, error.message, extra={"request_id": training.request_id})
            self.liveness.set("trainer", PartState.failing, error.message)
            self._paused_until = time.monotonic() + DATABASE_PAUSE_S
        except Exception as error:
            failure = error if isinstance(error, ServiceError) else TrainingFailedError(
                f"the training failed; the server log has the details (request id {training.request_id or training.id})"
            )  # fmt: skip
            logger.error("training %s failed: %s", training.id, failure.message, exc_info=error, extra={"request_id": training.request_id})
            self.liveness.set("trainer", PartState.failing, summary(error))
            self._end(training, TrainingStatus.failed, failure)
            self.engine.free_memory()

    def _advance(self, training: Training) -> None:
        """Prepare the training's run, or train one slice and checkpoint; at the last step, finish."""
        if training.cancel_requested:
            self._end(training, TrainingStatus.cancelled)
            return
        run = self._runs.get(training.id)
        if run is None:
            self._start(training)
            return
        if training.status is TrainingStatus.preparing:
            if run.prepare():  # a piece a slice: class pictures are drawn between generation batches
                transition(training, TrainingStatus.training)
                self._announce(training)
            return
        if run.step < training.settings.steps:
            self._train_slice(training, run)
        if run.step >= training.settings.steps:
            self._finish(training, run)
            return
        if self._sample_due(training):
            self._draw_progress_samples(training, run)
        if training.step - training.checkpoint_step >= self.settings.training_checkpoint_every:
            run.save_checkpoint(self.folder / training.id / CHECKPOINT)
            training.checkpoint_step, training.attempts = training.step, 0
            self.writer.persist([training])

    def _train_slice(self, training: Training, run: TrainingRun) -> None:
        """Up to SD_TRAINING_SLICE_STEPS steps; the loss, the pace and a progress event."""
        started = time.monotonic()
        steps = min(self.settings.training_slice_steps, training.settings.steps - run.step)
        training.loss = round(run.run(steps), 6)
        training.step = run.step
        pace = (time.monotonic() - started) / steps
        training.seconds_per_step = round(pace if training.seconds_per_step is None else 0.8 * training.seconds_per_step + 0.2 * pace, 4)
        self.bus.emit(training, "progress", progress(training))

    def _sample_due(self, training: Training) -> bool:
        """True when SD_TRAINING_SAMPLE_EVERY steps have passed since the last samples (or the start)."""
        every = self.settings.training_sample_every
        last = max(training.progress_samples, default=0)
        return every > 0 and training.step - last >= every

    def _draw_progress_samples(self, training: Training, run: TrainingRun) -> None:
        """Draw the samples as the adapter is now, store them under this step, and send a ``samples`` event."""
        training.progress_samples[training.step] = self._store_samples(training, run.samples(training.settings.sample_prompts), training.step)
        self.writer.persist([training])
        self.bus.emit(training, "samples", {"step": training.step, "samples": sample_urls(training, training.step)})

    def _start(self, training: Training) -> None:
        """Load the base and encode the photos; continue from the checkpoint a crash left, if any. The rest of the
        preparation (``TrainingRun.prepare``) runs in the next slices."""
        training.started_at = training.started_at or utc_now()
        self._announce(training)
        folder = self.folder / training.id
        run = self.engine.start_training(training.base, photo_paths(folder / "photos"), training.settings)
        if (folder / CHECKPOINT).exists():
            run.load_checkpoint(folder / CHECKPOINT)
            logger.info("training %s resumes from step %d", training.id, run.step, extra={"request_id": training.request_id})
        training.step = training.checkpoint_step = run.step
        self._runs[training.id] = run

    def _finish(self, training: Training, run: TrainingRun) -> None:
        """Export the LoRA and store the samples (once), then commit: a cancel that came first wins (nothing changes;
        what was made goes, in ``_end``); past the commit a cancel answers 409, the LoRA is kept under its content
        hash and becomes the user's model (``activate``). A database that is away raises here, and the next slice
        commits again."""
        output = self._outputs.get(training.id) or self._make_output(training, run)
        with self._lock:
            training.committed = not training.cancel_requested
        if not training.committed:
            self._end(training, TrainingStatus.cancelled)
            return
        if output.model is None:
            source = keep_upload(output.staged, hashlib.sha256(output.staged.read_bytes()).hexdigest(), self.settings.models_dir)
            output.model = LoraModel(base=training.base, source=source, scale=1.0)
        training.model = output.model
        if training.settings.activate and not training.deleted:
            previous = self.registry.set(training.user_id, output.model)
            unload_if_unused(previous, self.registry, self.engine)
        self._end(training, TrainingStatus.succeeded)

    def _make_output(self, training: Training, run: TrainingRun) -> TrainedOutput:
        """The adapter exported to the staging folder, the samples drawn with it and stored."""
        output = TrainedOutput(self.settings.models_dir / STAGING_FOLDER / f"training-{training.id}.safetensors")
        output.staged.parent.mkdir(parents=True, exist_ok=True)
        self._outputs[training.id] = output  # from here on, ``_end`` removes what it holds unless the training succeeds
        run.export(output.staged)
        pictures = run.samples(training.settings.sample_prompts)
        training.scores = self._scores(training, pictures)
        output.samples = self._store_samples(training, pictures)
        training.samples = list(output.samples)
        return output

    def _store_samples(self, training: Training, pictures: list[Any], step: int | None = None) -> list[str]:
        """Encode the sample pictures (their prompts as parameters) and store them; their keys (``sample_key``)."""
        pngs = self.engine.encode(pictures, training.settings.sample_prompts)
        keys = [sample_key(training, index, step) for index in range(len(pngs))]
        for key, png in zip(keys, pngs):
            self.storage.put(key, png)
        return keys

    def _scores(self, training: Training, pictures: list[Any]) -> dict[str, Any] | None:
        """The recipe's evaluator's reading of the final samples, if it names one (None when it fails: a score is
        never worth a training)."""
        scorer = self.evaluators.get(training.settings.evaluator or "")
        if scorer is None:
            return None
        try:
            return scorer(photo_paths(self.folder / training.id / "photos"), pictures, training.settings)
        except Exception:
            logger.exception("training %s: evaluator %s failed", training.id, training.settings.evaluator, extra={"request_id": training.request_id})
            return None

    # --- shared --------------------------------------------------------------------------------------

    def _check_room(self, user_id: str) -> None:
        """429 while the user has a training active, or an upload being checked (with the lock held)."""
        running = next((training for training in self._active if training.user_id == user_id), None)
        if running is not None:
            raise TrainingLimitError(
                f"user '{user_id}' already has training {running.id} {running.status.value}; one at a time "
                f"(cancel it with POST /trainings/{running.id}/cancel)",
                max(1, int(running.eta_s or 60)),
            )
        if user_id in self._reserved:
            raise TrainingLimitError(f"user '{user_id}' already has a training upload being checked; one at a time", 5)

    def _end(self, training: Training, status: TrainingStatus, error: ServiceError | None = None) -> None:
        """Drop its files (and what an unfinished commit made), move the training to a terminal state, store it,
        and tell its followers and webhook."""
        self._runs.pop(training.id, None)
        output = self._outputs.pop(training.id, None)
        if output is not None and status is not TrainingStatus.succeeded:
            self._discard(training, output)
        if status is TrainingStatus.cancelled:  # a failed one keeps them: they show how far it got
            for key in training.progress_sample_keys:
                self.storage.delete(key)
            training.progress_samples = {}
        # The photos and checkpoint, no longer needed, go first: whoever sees the training ended finds them gone.
        shutil.rmtree(self.folder / training.id, ignore_errors=True)
        transition(training, status, (error.message, error.status_code) if error else None)
        self.writer.persist([training])  # stored before it leaves the active list: a reader finds one or the other
        self._drop(training)
        self.writer.publish_ends([training])  # a deleted one's followers learn that it ended too

    def _discard(self, training: Training, output: TrainedOutput) -> None:
        """Remove what a training that did not succeed made: its samples and its staged LoRA."""
        for key in output.samples:
            self.storage.delete(key)
        training.samples, training.model = [], None
        output.staged.unlink(missing_ok=True)

    def _announce(self, training: Training) -> None:
        """Store the training's state (later, if the database is away) and send it to its followers."""
        self.writer.persist([training])
        self.bus.emit(training, training.status.value)

    def _drop(self, training: Training) -> None:
        with self._lock:
            if training in self._active:
                self._active.remove(training)


def sample_urls(training: Training, step: int | None = None) -> list[str]:
    """Where the API serves the training's samples: of the trained model, or as it was at ``step``."""
    keys = training.samples if step is None else training.progress_samples.get(step, [])
    query = "" if step is None else f"?step={step}"
    return [f"/trainings/{training.id}/samples/{index}{query}" for index in range(len(keys))]


def progress(training: Training) -> dict[str, Any]:
    """A training's progress, as its events and its JSON show it."""
    return {"step": training.step, "total": training.settings.steps, "loss": training.loss, "eta_s": training.eta_s}


def fingerprint(settings: TrainingSettings, photos: list[bytes], webhook_url: str | None) -> str:
    """What makes two submissions the same: the settings, the webhook and the uploaded files' bytes (known before
    anything is decoded, so an idempotent repeat costs no decoding)."""
    digest = hashlib.sha256(json.dumps([asdict(settings), webhook_url]).encode())
    for photo in photos:
        digest.update(hashlib.sha256(photo).digest())
    return digest.hexdigest()
