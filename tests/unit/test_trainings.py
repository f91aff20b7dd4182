"""Trainings as a part, called directly on the fake engine: the device worker's slices run here on the test's own
thread, so every step of the lifecycle is seen as it happens (no app, no worker threads)."""

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from config import Settings
from fakes import FakeEngine
from sd_server.domain.trainings import Training, TrainingSettings, TrainingStatus
from sd_server.errors import JobFinishedError, TrainingLimitError
from sd_server.jobs.events import EventBus, WorkEvent
from sd_server.jobs.trainings import Trainings
from sd_server.jobs.writer import Writer
from sd_server.observability.liveness import Liveness
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.persistence.job_store import SqlJobStore
from sd_server.persistence.training_store import SqlTrainingStore
from sd_server.registry import ModelRegistry
from sd_server.storage.images import LocalStorage

STEPS = TrainingSettings(steps=20, resolution=64)


@dataclass
class Setup:
    """The trainings part, its store, and every event it published."""

    trainings: Trainings
    store: SqlTrainingStore
    events: list[WorkEvent]
    woken: list[bool]

    def fresh(self, engine: FakeEngine) -> Trainings:
        """Another Trainings on the same database and folders (the service after a restart)."""
        old = self.trainings
        writer = Writer(old.writer.jobs, self.store, old.bus, Liveness())
        return Trainings(old.settings, engine, old.registry, self.store, old.storage, writer, old.bus, Liveness(), lambda: None)


@pytest.fixture
def setup(settings: Settings, engine: FakeEngine, tmp_path: Path) -> Iterator[Setup]:
    settings.training_slice_steps, settings.training_checkpoint_every = 5, 10
    migrate(settings.effective_database_url)
    database = create_database_engine(settings.effective_database_url)
    events: list[WorkEvent] = []
    woken: list[bool] = []
    bus = EventBus([lambda event: events.append(event) if isinstance(event, WorkEvent) else None])
    loop = asyncio.new_event_loop()
    bus.bind(loop)  # never run: the SSE side is not under test here
    store = SqlTrainingStore(database)
    writer = Writer(SqlJobStore(database), store, bus, Liveness())
    trainings = Trainings(
        settings, engine, ModelRegistry(settings, database), store, LocalStorage(tmp_path / "output"), writer, bus, Liveness(), lambda: woken.append(True)
    )
    yield Setup(trainings, store, events, woken)
    loop.close()
    database.dispose()


def submit(trainings: Trainings, user_id: str = "alice") -> Training:
    with trainings.reservation(user_id) as reservation:
        training, new = trainings.submit(reservation, "demo", STEPS, [Image.new("RGB", (64, 64))] * 3, "fingerprint")
    assert new
    return training


def run_until_ended(trainings: Trainings, training: Training, slices: int = 20) -> list[str]:
    """Run slices as the device worker would; the status after each."""
    seen = []
    for _ in range(slices):
        if training.status.is_terminal:
            break
        trainings.run_slice()
        seen.append(training.status.value)
    return seen


def test_a_training_goes_queued_preparing_training_succeeded_and_becomes_the_users_model(setup):
    training = submit(setup.trainings)

    seen = run_until_ended(setup.trainings, training)

    assert seen[:2] == ["preparing", "training"] and seen[-1] == "succeeded" and training.step == 20  # loaded, then prepared
    assert setup.woken == [True]  # the device was told of the new work
    names = [event.name for event in setup.events if event.work is training]
    assert names[0] == "queued" and names[1:3] == ["preparing", "training"] and names[-1] == "succeeded"
    assert names.count("progress") == 4
    assert setup.store.get(training.id).status is TrainingStatus.succeeded
    assert setup.trainings.registry.get("alice") == training.model


def test_one_training_per_user_is_refused_with_429_while_another_is_active(setup):
    submit(setup.trainings)

    with pytest.raises(TrainingLimitError, match="one at a time"):
        setup.trainings.check_room("alice")
    setup.trainings.check_room("bob")


def test_cancelling_a_queued_training_ends_it_at_once_and_an_ended_one_answers_409(setup):
    training = submit(setup.trainings)

    setup.trainings.cancel(training)

    assert training.status is TrainingStatus.cancelled and not setup.trainings.has_work()
    with pytest.raises(JobFinishedError):
        setup.trainings.cancel(training)


def test_a_restart_resumes_from_the_last_checkpoint_and_a_second_crash_there_fails_it(setup, engine):
    training = submit(setup.trainings)
    for _ in range(5):  # load, prepare, then 3 slices of 5 steps: a checkpoint at step 10
        setup.trainings.run_slice()
    assert training.checkpoint_step == 10 and training.step == 15

    resumed = setup.fresh(engine)
    resumed.recover()
    again = resumed.get(training.id)
    assert again is not None and again.status is TrainingStatus.queued and again.attempts == 1 and again.step == 10
    resumed.run_slice()
    resumed.run_slice()
    assert again.step == 10 and again.status is TrainingStatus.training

    crashed_twice = setup.fresh(engine)
    crashed_twice.recover()
    assert setup.store.get(training.id).status is TrainingStatus.failed
    assert "stopped twice" in (setup.store.get(training.id).error or "")
