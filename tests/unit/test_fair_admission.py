"""Admission that protects light users: the heavy users who filled the queue are refused, never a user with
nothing queued; caps of queued pixel-steps per user and per tenant; Retry-After from the user's own backlog."""

import pytest

from config import Settings
from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job
from sd_server.domain.models import CheckpointModel
from sd_server.errors import QueueFullError, QuotaExceededError
from sd_server.jobs.admission import Backlog, check_capacity
from sd_server.jobs.batching import BatchRules
from sd_server.jobs.dispatch import BatchStats, Dispatcher
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.scheduler import FairScheduler

LIMITS = Settings(_env_file=None, max_queue=64, queue_reserve=16, max_active_jobs_per_user=16)


def job(user: str = "eve", steps: int = 30, tenant: str = "") -> Job:
    request = Generation("a photo", None, user, steps, 7.5, 512, 512, None, 1, None)
    return Job(request, "demo", 7, synchronous=False, model=CheckpointModel(source="demo"), tenant=tenant)


def backlog(**fields: int) -> Backlog:
    defaults = {"user_active": 0, "user_queued": 0, "user_cost": 0, "tenant_cost": 0, "queued": 0, "active_users": 1}
    return Backlog(**(defaults | fields))


def no_wait(backlog: Backlog) -> int:
    return 5


def test_a_user_with_nothing_queued_gets_in_when_heavy_users_filled_the_queue():
    check_capacity(LIMITS, job(), backlog(queued=64, active_users=5), no_wait)  # passes
    check_capacity(LIMITS, job(), backlog(queued=79, active_users=20), no_wait)  # passes


def test_a_heavy_user_is_refused_by_the_full_queue_with_their_own_retry_after():
    with pytest.raises(QueueFullError, match="SD_MAX_QUEUE") as refused:
        check_capacity(LIMITS, job(), backlog(user_active=3, user_queued=3, user_cost=3, queued=64), no_wait)

    assert refused.value.headers == {"Retry-After": "5"}


def test_the_reserve_for_light_users_is_bounded():
    with pytest.raises(QueueFullError, match="SD_QUEUE_RESERVE"):
        check_capacity(LIMITS, job(), backlog(queued=80, active_users=30), no_wait)


def test_queued_pixel_steps_are_capped_per_user_but_a_user_with_nothing_queued_may_always_queue_one_job():
    settings = LIMITS.model_copy(update={"max_queued_cost_per_user": job().cost * 2})
    huge = job(steps=150)

    check_capacity(settings, huge, backlog(), no_wait)  # alone, it passes
    with pytest.raises(QuotaExceededError, match="SD_MAX_QUEUED_COST_PER_USER"):
        check_capacity(settings, job(), backlog(user_active=2, user_queued=2, user_cost=job().cost * 2), no_wait)


def test_queued_pixel_steps_are_capped_per_tenant_across_its_users():
    settings = LIMITS.model_copy(update={"max_queued_cost_per_tenant": job().cost * 3})

    with pytest.raises(QuotaExceededError, match="tenant 'app'.*SD_MAX_QUEUED_COST_PER_TENANT"):
        check_capacity(settings, job(tenant="app"), backlog(tenant_cost=job().cost * 3), no_wait)


def test_retry_after_is_the_time_the_user_own_backlog_takes_at_their_share_of_the_device():
    queue = JobQueue(FairScheduler(BatchRules(4, 2)), max_batch_images=4, batch_wait_s=0.0)
    dispatcher = Dispatcher(LIMITS, queue, engine=None, writer=None, bus=None, readiness=None)  # type: ignore[arg-type]
    dispatcher.batch_stats = BatchStats(seconds_per_cost=1e-6)

    heavy = dispatcher.retry_after_s(backlog(user_cost=2_000_000, active_users=4, queued=60))
    light = dispatcher.retry_after_s(backlog(user_cost=100_000, active_users=4, queued=60))

    assert heavy == 8 and light == 1
