"""The one lifecycle of jobs and trainings: which status changes are allowed, that an illegal one is an error, the
restart rule both kinds follow, and the event bus that announces changes."""

import asyncio

import pytest

from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, JobStatus
from sd_server.domain.lifecycle import TERMINAL, TRANSITIONS, IllegalTransitionError, Phase, transition
from sd_server.domain.trainings import Training, TrainingSettings, TrainingStatus
from sd_server.jobs.events import Event, EventBus
from sd_server.jobs.recovery import Restart, on_restart


def a_job() -> Job:
    return Job(Generation("a photo", None, "alice", 2, 7.5, 64, 64, None, 1, None), "demo", 7, synchronous=False)


def a_training() -> Training:
    return Training(user_id="alice", base="demo", settings=TrainingSettings(), photo_count=3)


def test_every_status_of_either_kind_stands_for_a_phase_and_training_is_the_running_phase():
    assert {status.phase for status in JobStatus} == set(Phase) - {Phase.preparing}
    assert {status.phase for status in TrainingStatus} == set(Phase)
    assert TrainingStatus.training.phase is Phase.running and TrainingStatus.training.value == "training"


def test_ended_work_never_changes_again():
    assert all(TRANSITIONS[phase] == frozenset() for phase in TERMINAL)
    job = a_job()
    transition(job, JobStatus.cancelled)
    for status in JobStatus:
        with pytest.raises(IllegalTransitionError, match=f"cannot go from cancelled to {status.value}"):
            transition(job, status)


def test_an_ending_stamps_the_time_and_the_failure_and_a_success_has_no_error():
    failed, succeeded = a_job(), a_training()
    transition(failed, JobStatus.running)
    transition(failed, JobStatus.failed, ("the device is gone", 503))
    for status in (TrainingStatus.preparing, TrainingStatus.training, TrainingStatus.succeeded):
        transition(succeeded, status)

    assert failed.finished_at is not None and (failed.error, failed.error_status) == ("the device is gone", 503)
    assert succeeded.finished_at is not None and (succeeded.error, succeeded.error_status) == (None, None)


def test_running_work_goes_back_to_the_queue_but_only_running_work_succeeds():
    job, training = a_job(), a_training()
    with pytest.raises(IllegalTransitionError, match="from queued to succeeded"):
        transition(job, JobStatus.succeeded)
    transition(job, JobStatus.running)
    transition(job, JobStatus.queued)  # a lost device or a restart gives it back
    with pytest.raises(IllegalTransitionError):
        transition(job, JobStatus.queued)  # queued -> queued is no change
    transition(training, TrainingStatus.preparing)
    with pytest.raises(IllegalTransitionError, match="training .* from preparing to succeeded"):
        transition(training, TrainingStatus.succeeded)


def test_restart_queues_queued_work_retries_interrupted_work_once_then_fails_it():
    assert on_restart(Phase.queued, attempts=3) is Restart.queue
    assert on_restart(Phase.running, attempts=0) is Restart.retry
    assert on_restart(Phase.preparing, attempts=0) is Restart.retry
    assert on_restart(Phase.running, attempts=1) is Restart.fail


def test_a_listener_that_fails_does_not_keep_the_others_or_the_subscribers_from_the_event(caplog):
    told: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("a metrics backend is down")

    bus, loop = EventBus([broken, lambda event: told.append(event.name)]), asyncio.new_event_loop()
    bus.bind(loop)
    job = a_job()
    stream = bus.subscribe(job)
    transition(job, JobStatus.cancelled)
    bus.emit(job, "cancelled")
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()

    assert told == ["cancelled"] and "an event listener failed" in caplog.text
    assert stream.get_nowait() == ("cancelled", {}) and job.finished.is_set()


class CountingLoop:
    """An event loop stand-in that counts the callbacks handed to it from other threads."""

    def __init__(self) -> None:
        self.callbacks = 0

    def call_soon_threadsafe(self, callback, *args) -> None:
        self.callbacks += 1


def test_progress_nobody_streams_never_wakes_the_event_loop_but_every_end_and_every_streamed_step_does():
    bus, loop = EventBus(), CountingLoop()
    bus.bind(loop)  # type: ignore[arg-type]
    unwatched, watched = a_job(), a_job()
    bus.subscribe(watched)

    for step in range(20):
        bus.emit(unwatched, "progress", {"step": step})
    quiet = loop.callbacks
    bus.emit(watched, "progress", {"step": 1})
    transition(unwatched, JobStatus.cancelled)
    bus.emit(unwatched, "cancelled")

    assert quiet == 0
    assert loop.callbacks == 2
