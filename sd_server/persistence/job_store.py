"""The job store on SQLAlchemy: every job in the database, the live object of active jobs in memory."""

import threading
from datetime import datetime

from sqlalchemy import Engine, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from sd_server.domain.generation import Generation, SchedulerName
from sd_server.domain.jobs import Job, JobQuery, JobStatus, StoredImage, as_utc
from sd_server.domain.models import USER_MODEL
from sd_server.persistence.tables import ImageRow, JobRow

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
    row.model_spec = USER_MODEL.dump_json(job.model).decode()
    row.scheduler = job.request.scheduler.value if job.request.scheduler else None
    if len(row.images) != len(job.images):
        row.images = [
            ImageRow(position=index, seed=image.seed, storage_key=image.key, size_bytes=image.size_bytes, sha256=image.sha256)
            for index, image in enumerate(job.images)
        ]
    return row


def to_job(row: JobRow) -> Job:
    """A Job from its row (the live fields, cancel flag and PNG bytes, start empty)."""
    scheduler = SchedulerName(row.scheduler) if row.scheduler else None
    request = Generation(**{name: getattr(row, name) for name in REQUEST_COLUMNS}, seed=row.seed, scheduler=scheduler)
    fields = {name: getattr(row, name) for name in JOB_COLUMNS}
    for name in ("created_at", "started_at", "finished_at"):
        fields[name] = as_utc(fields[name])
    images = [StoredImage(image.seed, image.storage_key, image.size_bytes, image.sha256) for image in row.images]
    model = USER_MODEL.validate_json(row.model_spec) if row.model_spec else None
    job = Job(request=request, status=JobStatus(row.status), images=images, model=model, **fields)
    if job.status.is_terminal:
        job.finished.set()
    return job


class SqlJobStore:
    """Jobs in SQLite or PostgreSQL; active jobs also as live objects, so progress and cancel need no query."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        """Insert a new job and keep it live."""
        with Session(self.engine) as session, session.begin():
            session.add(to_row(job, JobRow(images=[])))
        with self._lock:
            self._live[job.id] = job

    def save(self, job: Job) -> None:
        """Write the job's state; a job that has ended is no longer kept live."""
        with Session(self.engine) as session, session.begin():
            row = session.get(JobRow, job.id)
            if row is not None:  # else deleted meanwhile
                to_row(job, row)
        if job.status.is_terminal:
            with self._lock:
                self._live.pop(job.id, None)

    def get(self, job_id: str) -> Job | None:
        """The live job, or the job as stored, or None."""
        if live := self._live.get(job_id):
            return live
        with Session(self.engine) as session:
            row = session.get(JobRow, job_id)
            return to_job(row) if row else None

    def delete(self, job_id: str) -> Job | None:
        """Delete the job and its image rows; returns the job as it was, or None."""
        job = self.get(job_id)
        if job:
            with Session(self.engine) as session, session.begin():
                session.execute(delete(ImageRow).where(ImageRow.job_id == job_id))
                session.execute(delete(JobRow).where(JobRow.id == job_id))
            with self._lock:
                self._live.pop(job_id, None)
        return job

    def find_by_idempotency_key(self, key: str) -> Job | None:
        """The job submitted with that (user-scoped) idempotency key, or None."""
        with Session(self.engine) as session:
            job_id = session.scalar(select(JobRow.id).where(JobRow.idempotency_key == key))
        return self.get(job_id) if job_id else None

    def page(self, query: JobQuery) -> tuple[list[Job], int, tuple[datetime, str] | None]:
        """Jobs matching ``query``, newest first; the total that match; and the cursor of the next page."""
        filters = []
        if query.user_id is not None:
            filters.append(JobRow.user_id == query.user_id)
        if query.status is not None:
            filters.append(JobRow.status == query.status.value)
        if query.created_after is not None:
            filters.append(JobRow.created_at >= query.created_after)
        if query.created_before is not None:
            filters.append(JobRow.created_at < query.created_before)
        page_filters = list(filters)
        if query.cursor is not None:
            created, job_id = query.cursor
            page_filters.append(or_(JobRow.created_at < created, and_(JobRow.created_at == created, JobRow.id < job_id)))
        statement = select(JobRow).where(*page_filters).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        with Session(self.engine) as session:
            total = session.scalar(select(func.count()).select_from(JobRow).where(*filters))
            rows = session.scalars(statement.offset(query.offset).limit(query.limit + 1)).all()
            jobs = [self._live.get(row.id) or to_job(row) for row in rows[: query.limit]]
        next_cursor = (jobs[-1].created_at, jobs[-1].id) if len(rows) > query.limit else None
        return jobs, total, next_cursor

    def owner_of_image(self, key: str) -> str | None:
        """The user whose job made the image stored under ``key``, or None."""
        with Session(self.engine) as session:
            statement = select(JobRow.user_id).join(ImageRow, ImageRow.job_id == JobRow.id).where(ImageRow.storage_key == key)
            return session.scalar(statement)

    def unfinished(self) -> list[Job]:
        """Jobs that were queued or running when the service last stopped, oldest first."""
        statuses = (JobStatus.queued.value, JobStatus.running.value)
        with Session(self.engine) as session:
            rows = session.scalars(select(JobRow).where(JobRow.status.in_(statuses)).order_by(JobRow.created_at)).all()
            jobs = [to_job(row) for row in rows]
        with self._lock:
            self._live.update({job.id: job for job in jobs})
        return jobs

    def finished_before(self, cutoff: datetime) -> list[Job]:
        """Jobs that ended before ``cutoff``."""
        with Session(self.engine) as session:
            rows = session.scalars(select(JobRow).where(JobRow.finished_at < cutoff)).all()
            return [to_job(row) for row in rows]
