"""Admission: what a new job must pass before it is queued, and the job record it becomes."""

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from config import Settings
from sd_server.domain.generation import MAX_SEED, Generation
from sd_server.domain.jobs import Job, Priority, WebhookEvent
from sd_server.domain.models import UserModel
from sd_server.domain.trainings import Training
from sd_server.errors import (
    IdempotencyConflictError,
    JobTooLargeError,
    QueueFullError,
    QuotaExceededError,
)

DEFAULT_WEBHOOK_EVENTS = frozenset({WebhookEvent.completed})


@dataclass(frozen=True)
class Share:
    """What a job's key gives it: its priority class, its user's weight, the tenant whose limits it counts against
    (None: the job's user), and the key itself (whose secret signs the job's webhooks)."""

    priority: Priority = Priority.interactive
    weight: float = 1.0
    tenant: str | None = None
    key_id: str | None = None


@dataclass(frozen=True)
class Backlog:
    """The queue a new job would join: the user's part of it (jobs and pixel-steps), the tenant's pixel-steps, and
    the whole (jobs, and users with work)."""

    user_active: int  # the user's jobs queued, running or being admitted
    user_queued: int  # the user's jobs queued or being admitted
    user_cost: int  # their pixel-steps
    tenant_cost: int  # pixel-steps queued by the tenant's jobs
    queued: int
    active_users: int  # users with a job queued or running, the new job's user included


def new_job(
    settings: Settings,
    request: Generation,
    model: UserModel,
    synchronous: bool,
    webhook_url: str | None,
    idempotency_key: str | None,
    request_id: str | None,
    share: Share = Share(),
    webhook_events: frozenset[WebhookEvent] = DEFAULT_WEBHOOK_EVENTS,
) -> Job:
    """The job for ``request``, its seed drawn when left out; JobTooLargeError past SD_MAX_PIXEL_STEPS."""
    if request.work > settings.max_pixel_steps:
        raise JobTooLargeError(
            f"width x height x num_inference_steps x num_images{' (with hires fix at its size)' if request.hires else ''} = "
            f"{request.work} is over {settings.max_pixel_steps} (SD_MAX_PIXEL_STEPS); ask for fewer pixels, steps or images"
        )
    events = "" if webhook_events == DEFAULT_WEBHOOK_EVENTS else "|" + ",".join(sorted(event.value for event in webhook_events))
    fingerprint = hashlib.sha256(f"{request.canonical_json()}|{webhook_url}{events}".encode()).hexdigest()
    scoped = scoped_key(request.user_id, idempotency_key)
    seed = request.seed if request.seed is not None else random.randint(0, MAX_SEED - request.num_images + 1)
    return Job(
        request, model.label, seed, synchronous, webhook_url, scoped, fingerprint, request_id, model=model,
        priority=share.priority, weight=share.weight, tenant=share.tenant or request.user_id, key_id=share.key_id,
        webhook_events=webhook_events,
    )  # fmt: skip


def scoped_key(user_id: str, idempotency_key: str | None) -> str | None:
    """An Idempotency-Key as stored: per user, so that two users' keys never meet."""
    return f"{user_id}:{idempotency_key}" if idempotency_key else None


def check_repeat(fingerprint: str, existing: Job | Training, idempotency_key: str) -> None:
    """An idempotent retry (its body's ``fingerprint``) must carry the same body as the job (or training) its key made."""
    if existing.fingerprint != fingerprint:
        raise IdempotencyConflictError(f"Idempotency-Key '{idempotency_key}' was used for another request body")


def check_capacity(settings: Settings, job: Job, backlog: Backlog, retry_after_s: Callable[[Backlog], int]) -> None:
    """Room for ``job``: the user's caps on active jobs and queued pixel-steps, the tenant's cap, then the queue's.
    A user with nothing queued passes the queue's cap (up to SD_QUEUE_RESERVE places past it) and the cost caps: the
    heavy users who filled the queue are refused, never a light one."""
    user, light = job.user_id, backlog.user_queued == 0
    if backlog.user_active >= settings.max_active_jobs_per_user:
        raise QuotaExceededError(
            f"user '{user}' has {backlog.user_active} jobs queued or running (SD_MAX_ACTIVE_JOBS_PER_USER); "
            "wait for one to finish",
            retry_after_s(backlog),
        )
    if not light and backlog.user_cost + job.cost > settings.max_queued_cost_per_user:
        raise QuotaExceededError(
            f"user '{user}' has {backlog.user_cost} pixel-steps queued, and this job's {job.cost} would pass "
            f"{settings.max_queued_cost_per_user} (SD_MAX_QUEUED_COST_PER_USER); wait for some to run",
            retry_after_s(backlog),
        )
    tenant_cap = settings.max_queued_cost_per_tenant
    if tenant_cap is not None and backlog.tenant_cost and backlog.tenant_cost + job.cost > tenant_cap:
        raise QuotaExceededError(
            f"tenant '{job.tenant}' has {backlog.tenant_cost} pixel-steps queued, and this job's {job.cost} would pass "
            f"{tenant_cap} (SD_MAX_QUEUED_COST_PER_TENANT); wait for some to run",
            retry_after_s(backlog),
        )
    if backlog.queued >= settings.max_queue + (settings.queue_reserve if light else 0):
        where = "for users with nothing queued (SD_MAX_QUEUE + SD_QUEUE_RESERVE)" if light else f"({settings.max_queue} jobs, SD_MAX_QUEUE)"
        raise QueueFullError(f"the queue is full {where}; retry later", retry_after_s(backlog))
