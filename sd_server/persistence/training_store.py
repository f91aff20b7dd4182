"""The training store on SQLAlchemy: every training in the database, read back as a Training."""

import dataclasses
import json

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sd_server.domain.jobs import as_utc
from sd_server.domain.models import LoraModel
from sd_server.domain.trainings import Training, TrainingSettings, TrainingStatus
from sd_server.persistence.retry import in_session
from sd_server.persistence.tables import TrainingRow

# Columns that hold a Training field under the same name.
COLUMNS = (
    "id", "user_id", "base", "photo_count", "webhook_url", "key_id", "idempotency_key", "fingerprint", "request_id", "step",
    "checkpoint_step", "loss", "seconds_per_step", "attempts", "error", "error_status", "created_at", "started_at",
    "finished_at",
)  # fmt: skip
ACTIVE = [status.value for status in TrainingStatus if not status.is_terminal]


def to_row(training: Training, row: TrainingRow) -> TrainingRow:
    """Copy the training's fields onto ``row``."""
    for name in COLUMNS:
        setattr(row, name, getattr(training, name))
    row.status = training.status.value
    row.settings = json.dumps(dataclasses.asdict(training.settings))
    row.samples = json.dumps(training.samples)
    row.warnings = json.dumps(training.warnings)
    row.progress_samples = json.dumps(training.progress_samples)
    row.scores = json.dumps(training.scores) if training.scores is not None else None
    row.model_spec = training.model.model_dump_json() if training.model else None
    return row


def to_training(row: TrainingRow) -> Training:
    """A Training from its row."""
    fields = {name: getattr(row, name) for name in COLUMNS}
    for name in ("created_at", "started_at", "finished_at"):
        fields[name] = as_utc(fields[name])
    model = LoraModel.model_validate_json(row.model_spec) if row.model_spec else None
    training = Training(
        settings=TrainingSettings(**json.loads(row.settings)),
        status=TrainingStatus(row.status),
        samples=json.loads(row.samples),
        warnings=json.loads(row.warnings or "[]"),
        scores=json.loads(row.scores) if row.scores else None,
        progress_samples={int(step): keys for step, keys in json.loads(row.progress_samples or "{}").items()},
        model=model,
        **fields,
    )
    if training.status.is_terminal:
        training.finished.set()
    return training


class SqlTrainingStore:
    """Trainings in the database; every operation retried through passing failures for ``retry_s`` seconds."""

    def __init__(self, engine: Engine, retry_s: float = 60.0) -> None:
        self.engine, self.retry_s = engine, retry_s

    def add(self, training: Training) -> Training:
        """Insert a new training; with an idempotency key already stored, the training stored under it."""

        def insert(session: Session) -> None:
            session.add(to_row(training, TrainingRow()))

        try:
            in_session(self.engine, insert, f"storing training {training.id}", self.retry_s, write=True)
        except IntegrityError:
            existing = self.find_by_idempotency_key(training.idempotency_key or "")
            if existing is None:
                raise
            return existing
        return training

    def save(self, training: Training) -> None:
        """Write the training's current state (nothing, once it was deleted)."""

        def update(session: Session) -> None:
            row = session.get(TrainingRow, training.id)
            if row is not None:
                to_row(training, row)

        in_session(self.engine, update, f"updating training {training.id}", self.retry_s, write=True)

    def get(self, training_id: str) -> Training | None:
        """The training with that id, or None."""

        def read(session: Session) -> Training | None:
            row = session.get(TrainingRow, training_id)
            return to_training(row) if row else None

        return in_session(self.engine, read, f"reading training {training_id}", self.retry_s)

    def find_by_idempotency_key(self, key: str) -> Training | None:
        """The training stored under ``key``, or None."""
        statement = select(TrainingRow).where(TrainingRow.idempotency_key == key)

        def read(session: Session) -> Training | None:
            row = session.scalars(statement).first()
            return to_training(row) if row else None

        return in_session(self.engine, read, "reading a training by idempotency key", self.retry_s)

    def page(self, user_id: str | None, limit: int, offset: int) -> tuple[list[Training], int]:
        """Trainings newest first (one user's, or everyone's): one page, and how many there are in all."""
        where = [TrainingRow.user_id == user_id] if user_id is not None else []
        statement = select(TrainingRow).where(*where).order_by(TrainingRow.created_at.desc(), TrainingRow.id).limit(limit).offset(offset)
        count = select(func.count()).select_from(TrainingRow).where(*where)

        def read(session: Session) -> tuple[list[Training], int]:
            return [to_training(row) for row in session.scalars(statement)], session.scalar(count) or 0

        return in_session(self.engine, read, "listing trainings", self.retry_s)

    def unfinished(self) -> list[Training]:
        """The trainings the last run left queued, preparing or training, oldest first."""
        statement = select(TrainingRow).where(TrainingRow.status.in_(ACTIVE)).order_by(TrainingRow.created_at)

        def read(session: Session) -> list[Training]:
            return [to_training(row) for row in session.scalars(statement)]

        return in_session(self.engine, read, "reading unfinished trainings", self.retry_s)

    def delete(self, training_id: str) -> None:
        """Remove the training's record."""
        statement = delete(TrainingRow).where(TrainingRow.id == training_id)
        in_session(self.engine, lambda session: session.execute(statement), f"deleting training {training_id}", self.retry_s, write=True)
