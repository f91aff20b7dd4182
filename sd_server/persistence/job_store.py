"""The job store on SQLAlchemy: every job in the database, the live object of active jobs in memory."""

import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Engine, and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sd_server.domain.generation import Generation, Hires, ImageInput, SchedulerName
from sd_server.domain.jobs import Job, JobQuery, JobStatus, Priority, StoredImage, WebhookEvent, as_utc
from sd_server.domain.models import USER_MODEL
from sd_server.persistence.retry import in_session, with_retries
from sd_server.persistence.tables import ImageRow, JobRow

T = TypeVar("T")

# Columns that hold a request field, and columns that hold a job field, under the same name.
REQUEST_COLUMNS = ("prompt", "negative_prompt", "user_id", "num_inference_steps", "guidance_scale", "width", "height", "num_images")
JOB_COLUMNS = (
    "id", "model_id", "seed", "synchronous", "webhook_url", "idempotency_key", "fingerprint", "request_id", "step",
    "total_steps", "batch_size", "attempts", "scheduler_used", "generation_seconds", "error", "error_status",
    "created_at", "started_at", "finished_at",
)  # fmt: skip


def to_row(job: Job, row: JobRow) -> JobRow:
    """Copy the job's fields onto ``row``."""
    for name in REQUEST_COLUMNS:
        setattr(row, name, getattr(job.request, name))
    for name in JOB_COLUMNS:
        setattr(row, name, getattr(job, name))
    row.status = job.status.value
    row.priority, row.weight, row.tenant, row.key_id = job.priority.value, job.weight, job.tenant, job.key_id
    row.webhook_events = ",".join(sorted(event.value for event in job.webhook_events))
    row.model_spec = USER_MODEL.dump_json(job.model).decode()
    row.scheduler = job.request.scheduler.value if job.request.scheduler else None
    row.image_input = json.dumps(asdict(job.request.image_input)) if job.request.image_input else None
    row.styles = json.dumps(list(job.request.styles)) if job.request.styles else None
    row.hires = json.dumps(asdict(job.request.hires)) if job.request.hires else None
    if len(row.images) != len(job.images):
        row.images = [
            ImageRow(position=index, seed=image.seed, storage_key=image.key, size_bytes=image.size_bytes, sha256=image.sha256)
            for index, image in enumerate(job.images)
        ]
    return row


def to_job(row: JobRow) -> Job:
    """A Job from its row (the live fields, cancel flag and PNG bytes, start empty)."""
    scheduler = SchedulerName(row.scheduler) if row.scheduler else None
    request = Generation(
        **{name: getattr(row, name) for name in REQUEST_COLUMNS},
        seed=row.seed,
        scheduler=scheduler,
        image_input=ImageInput(**json.loads(row.image_input)) if row.image_input else None,
        styles=tuple(json.loads(row.styles)) if row.styles else (),
        hires=Hires(**json.loads(row.hires)) if row.hires else None,
    )
    fields = {name: getattr(row, name) for name in JOB_COLUMNS}
    for name in ("created_at", "started_at", "finished_at"):
        fields[name] = as_utc(fields[name])
    images = [StoredImage(image.seed, image.storage_key, image.size_bytes, image.sha256) for image in row.images]
    model = USER_MODEL.validate_json(row.model_spec) if row.model_spec else None
    share = {"priority": Priority(row.priority or "interactive"), "weight": row.weight or 1.0, "tenant": row.tenant or row.user_id}
    events = frozenset(WebhookEvent(name) for name in (row.webhook_events or "completed").split(","))
    job = Job(
        request=request, status=JobStatus(row.status), images=images, model=model, key_id=row.key_id, webhook_events=events,
        **share, **fields,
    )  # fmt: skip
    if job.status.is_terminal:
        job.finished.set()
    return job


class SqlJobStore:
    """Jobs in SQLite or PostgreSQL; active jobs also as live objects, so progress and cancel need no query. Every
    operation is retried through passing database failures for up to ``retry_s`` seconds."""

    def __init__(self, engine: Engine, retry_s: float = 60.0) -> None:
        self.engine = engine
        self.retry_s = retry_s
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()
        # Writes of one job's state go one at a time: each writes the job as it is then, so the last one wins.
        self._write_lock = threading.Lock()

    def add(self, job: Job) -> Job:
        """Insert a new job and keep it live; returns it, or the job stored earlier under its idempotency key
        (a retry that raced its original)."""
        try:
            in_session(self.engine, lambda session: session.add(to_row(job, JobRow(images=[]))), "storing a new job", self.retry_s, write=True)
        except IntegrityError:
            existing = self.find_by_idempotency_key(job.idempotency_key) if job.idempotency_key else None
            if existing is None and self._read(lambda session: session.get(JobRow, job.id)) is None:
                raise
            return existing or job
        with self._lock:
            self._live[job.id] = job
        return job

    def save(self, job: Job) -> None:
        """Write the job's state; a job that has ended is no longer kept live."""
        with_retries(lambda: self._update(job), f"saving job {job.id}", self.retry_s)
        if job.status.is_terminal:
            with self._lock:
                self._live.pop(job.id, None)

    def get(self, job_id: str) -> Job | None:
        """The live job, or the job as stored, or None."""
        if live := self._live.get(job_id):
            return live
        row = self._read(lambda session: session.get(JobRow, job_id))
        return to_job(row) if row else None

    def delete(self, job_id: str) -> Job | None:
        """Delete the job and its image rows; returns the job as it was, or None."""
        job = self.get(job_id)
        if job:
            in_session(self.engine, lambda session: self._delete(session, job_id), f"deleting job {job_id}", self.retry_s, write=True)
            with self._lock:
                self._live.pop(job_id, None)
        return job

    def find_by_idempotency_key(self, key: str) -> Job | None:
        """The job submitted with that (user-scoped) idempotency key, or None."""
        job_id = self._read(lambda session: session.scalar(select(JobRow.id).where(JobRow.idempotency_key == key)))
        return self.get(job_id) if job_id else None

    def page(self, query: JobQuery) -> tuple[list[Job], int, tuple[datetime, str] | None]:
        """Jobs matching ``query``, newest first; the total that match; and the cursor of the next page. Times are
        compared as instants (a filter given with any UTC offset means the same moment on both databases)."""
        filters = []
        if query.user_id is not None:
            filters.append(JobRow.user_id == query.user_id)
        if query.status is not None:
            filters.append(JobRow.status == query.status.value)
        if query.created_after is not None:
            filters.append(JobRow.created_at >= as_utc(query.created_after))
        if query.created_before is not None:
            filters.append(JobRow.created_at < as_utc(query.created_before))
        page_filters = list(filters)
        if query.cursor is not None:
            created, job_id = as_utc(query.cursor[0]), query.cursor[1]
            page_filters.append(or_(JobRow.created_at < created, and_(JobRow.created_at == created, JobRow.id < job_id)))
        statement = select(JobRow).where(*page_filters).order_by(JobRow.created_at.desc(), JobRow.id.desc())

        def read(session: Session) -> tuple[int, list[Job], bool]:
            total = session.scalar(select(func.count()).select_from(JobRow).where(*filters))
            rows = session.scalars(statement.offset(query.offset).limit(query.limit + 1)).all()
            return total, [self._live.get(row.id) or to_job(row) for row in rows[: query.limit]], len(rows) > query.limit

        total, jobs, more = self._read(read)
        next_cursor = (jobs[-1].created_at, jobs[-1].id) if more else None
        return jobs, total, next_cursor

    def owner_of_image(self, key: str) -> str | None:
        """The user whose job made the image stored under ``key``, or None."""
        statement = select(JobRow.user_id).join(ImageRow, ImageRow.job_id == JobRow.id).where(ImageRow.storage_key == key)
        return self._read(lambda session: session.scalar(statement))

    def unfinished(self) -> list[Job]:
        """Jobs that were queued or running when the service last stopped, oldest first."""
        statuses = (JobStatus.queued.value, JobStatus.running.value)
        statement = select(JobRow).where(JobRow.status.in_(statuses)).order_by(JobRow.created_at)
        jobs = self._read(lambda session: [to_job(row) for row in session.scalars(statement)])
        with self._lock:
            self._live.update({job.id: job for job in jobs})
        return jobs

    def finished_before(self, cutoff: datetime) -> list[Job]:
        """Jobs that ended before ``cutoff``."""
        statement = select(JobRow).where(JobRow.finished_at < cutoff)
        return self._read(lambda session: [to_job(row) for row in session.scalars(statement)])

    def _read(self, query: Callable[[Session], T]) -> T:
        """Run ``query`` in a session of its own, retried through passing failures."""
        return in_session(self.engine, query, "reading jobs", self.retry_s)

    def _update(self, job: Job) -> None:
        with self._write_lock, Session(self.engine) as session, session.begin():
            row = session.get(JobRow, job.id)
            if row is not None:  # else deleted meanwhile
                to_row(job, row)

    @staticmethod
    def _delete(session: Session, job_id: str) -> None:
        session.execute(delete(ImageRow).where(ImageRow.job_id == job_id))
        session.execute(delete(JobRow).where(JobRow.id == job_id))
