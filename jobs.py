"""Job records and the job store: the one place that keeps them, behind a small interface."""

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from model_service import GeneratedPng
from schemas import GenerateRequest, GenerationParameters, JobStatus


def utc_now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(timezone.utc)


@dataclass
class Job:
    """One generation request, from submission to its images (or error)."""

    request: GenerateRequest
    model_id: str
    seed: int
    synchronous: bool
    webhook_url: str | None = None
    idempotency_key: str | None = None
    fingerprint: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.queued
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = 0
    total_steps: int = 0
    batch_size: int | None = None
    parameters: GenerationParameters | None = None
    generation_seconds: float | None = None
    images: list[GeneratedPng] = field(default_factory=list)
    error: str | None = None
    error_status: int | None = None
    cancel_requested: bool = False
    deadline: float = 0.0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.total_steps = self.request.num_inference_steps

    def take_pngs(self) -> list[bytes]:
        """The encoded images, handed over once: the record keeps only names and seeds after this."""
        pngs = [image.png for image in self.images]
        for image in self.images:
            image.png = b""
        return pngs

    def image_paths(self) -> list[Path]:
        """The files this job's images were saved to."""
        return [image.path for image in self.images if image.path is not None]


class JobStore(Protocol):
    """Keeps job records; the in-memory store below is the one implementation today."""

    def add(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def delete(self, job_id: str) -> Job | None: ...

    def find_by_idempotency_key(self, key: str) -> Job | None: ...

    def page(self, limit: int, offset: int, user_id: str | None = None) -> tuple[list[Job], int]: ...

    def expire(self) -> list[Job]: ...


class InMemoryJobStore:
    """Job records in a dict; finished jobs are forgotten ``ttl_s`` seconds after they end."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        """Keep ``job`` (and its idempotency key)."""
        with self._lock:
            self._jobs[job.id] = job
            if job.idempotency_key:
                self._by_key[job.idempotency_key] = job.id

    def get(self, job_id: str) -> Job | None:
        """The job with that id, or None."""
        return self._jobs.get(job_id)

    def delete(self, job_id: str) -> Job | None:
        """Forget the job; returns it, or None when there was none."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job and job.idempotency_key:
                self._by_key.pop(job.idempotency_key, None)
            return job

    def find_by_idempotency_key(self, key: str) -> Job | None:
        """The job submitted with that idempotency key, or None."""
        job_id = self._by_key.get(key)
        return self._jobs.get(job_id) if job_id else None

    def page(self, limit: int, offset: int, user_id: str | None = None) -> tuple[list[Job], int]:
        """Jobs newest first (optionally of one user), ``limit`` of them from ``offset``, and the total."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if user_id is None or job.request.user_id == user_id]
        jobs.sort(key=lambda job: job.created_at, reverse=True)
        return jobs[offset : offset + limit], len(jobs)

    def expire(self) -> list[Job]:
        """Forget the finished jobs older than the TTL; returns them."""
        cutoff = time.time() - self.ttl_s
        with self._lock:
            old = [job for job in self._jobs.values() if job.finished_at and job.finished_at.timestamp() < cutoff]
        return [job for job in old if self.delete(job.id)]
