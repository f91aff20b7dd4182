"""Admission: what a new job must pass before it is queued, and the job record it becomes."""

import hashlib
import random

from config import Settings
from sd_server.domain.generation import MAX_SEED, Generation
from sd_server.domain.jobs import Job
from sd_server.domain.models import UserModel
from sd_server.domain.trainings import Training
from sd_server.errors import (
    IdempotencyConflictError,
    JobTooLargeError,
    QueueFullError,
    QuotaExceededError,
)


def new_job(
    settings: Settings,
    request: Generation,
    model: UserModel,
    synchronous: bool,
    webhook_url: str | None,
    idempotency_key: str | None,
    request_id: str | None,
) -> Job:
    """The job for ``request``, its seed drawn when left out; JobTooLargeError past SD_MAX_PIXEL_STEPS."""
    if request.work > settings.max_pixel_steps:
        raise JobTooLargeError(
            f"width x height x num_inference_steps x num_images = {request.work} is over {settings.max_pixel_steps} "
            "(SD_MAX_PIXEL_STEPS); ask for fewer pixels, steps or images"
        )
    fingerprint = hashlib.sha256(f"{request.canonical_json()}|{webhook_url}".encode()).hexdigest()
    scoped = scoped_key(request.user_id, idempotency_key)
    seed = request.seed if request.seed is not None else random.randint(0, MAX_SEED - request.num_images + 1)
    return Job(request, model.label, seed, synchronous, webhook_url, scoped, fingerprint, request_id, model=model)


def scoped_key(user_id: str, idempotency_key: str | None) -> str | None:
    """An Idempotency-Key as stored: per user, so that two users' keys never meet."""
    return f"{user_id}:{idempotency_key}" if idempotency_key else None


def check_repeat(fingerprint: str, existing: Job | Training, idempotency_key: str) -> None:
    """An idempotent retry (its body's ``fingerprint``) must carry the same body as the job (or training) its key made."""
    if existing.fingerprint != fingerprint:
        raise IdempotencyConflictError(f"Idempotency-Key '{idempotency_key}' was used for another request body")


def check_capacity(settings: Settings, user_id: str, active_for_user: int, queued: int, retry_after_s: int) -> None:
    """Room for one more job: the user's cap on active jobs, then the queue's."""
    if active_for_user >= settings.max_active_jobs_per_user:
        raise QuotaExceededError(
            f"user '{user_id}' has {active_for_user} jobs queued or running (SD_MAX_ACTIVE_JOBS_PER_USER); "
            "wait for one to finish",
            retry_after_s,
        )
    if queued >= settings.max_queue:
        raise QueueFullError(f"the queue is full ({settings.max_queue} jobs, SD_MAX_QUEUE); retry later", retry_after_s)
