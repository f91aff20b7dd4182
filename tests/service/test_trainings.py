"""Trainings on the fake engine, where a test can hold a training at any point: a cancel or a delete that meets the
end of a training, a database that is away while one runs, and uploads that cannot hold up anyone else (one
training per user is refused before any decoding; decoding has threads of its own)."""

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers import DEADLINE_S, HeldLock, png_bytes, poll, post_job, sqlite_file, wait_for
from sd_server.api.routes import trainings as trainings_route

FIELDS = {"steps": "20", "resolution": "64"}
DEMO_MODEL = {"kind": "checkpoint", "source": "demo"}


@pytest.fixture
def training_settings(settings):
    """Small photos, slices of 5 steps, a checkpoint every 10."""
    settings.training_min_photo_side = 64
    settings.training_slice_steps = 5
    settings.training_checkpoint_every = 10
    return settings


def photo_files(count: int = 3, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    """``count`` distinct 64x64 photos as the multipart `images` field."""
    return [("images", (f"photo-{index}.png", png_bytes(seed + index, 64), "image/png")) for index in range(count)]


def start_training(client: TestClient, user_id: str = "alice", **fields: str) -> dict:
    """POST a training for ``user_id``; its 202 answer."""
    response = client.post(f"/users/{user_id}/trainings", files=photo_files(), data={**FIELDS, **fields})
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_training(client: TestClient, training_id: str, statuses=("succeeded", "failed", "cancelled")) -> dict:
    """Poll the training until it is in one of ``statuses``."""
    return poll(lambda: client.get(f"/trainings/{training_id}").json(), lambda training: training.get("status") in statuses, f"training {training_id} reaching {statuses}")


def sample_files(settings) -> list[Path]:
    """The sample images of trainings in the output folder."""
    return sorted(Path(settings.output_dir).glob("training-*"))


def at_the_last_step(client: TestClient, engine, request: Callable[[dict], object]) -> tuple[dict, object]:
    """Start a training for alice, hold it where its last step has run and its samples are being drawn, send
    ``request(training)`` then, and let it go on; the training's 202 answer and the request's answer."""
    engine.samples_gate = threading.Event()
    created = start_training(client)
    assert engine.samples_drawn.wait(DEADLINE_S), "the training never reached its samples"
    answer = request(created)
    engine.samples_gate.set()
    return created, answer


def test_a_cancel_that_meets_the_last_step_wins_and_leaves_no_model_and_no_samples(training_settings, app_factory, engine):
    with TestClient(app_factory(training_settings)) as client:
        created, cancelled = at_the_last_step(client, engine, lambda training: client.post(training["links"]["cancel"]))
        ended = wait_for_training(client, created["training_id"])
        model = client.get("/users/alice/model").json()["model"]

    assert cancelled.status_code == 200
    assert ended["status"] == "cancelled" and ended["model"] is None and ended["samples"] == []
    assert ended["progress"]["step"] == 20  # every step ran; the cancel still won
    assert model == DEMO_MODEL
    assert sample_files(training_settings) == []


def test_a_delete_that_meets_the_last_step_leaves_no_samples_behind(training_settings, app_factory, engine):
    with TestClient(app_factory(training_settings)) as client:
        created, deleted = at_the_last_step(client, engine, lambda training: client.delete(training["links"]["self"]))
        trainings = client.app.state.services.trainings
        poll(lambda: trainings.live(created["training_id"]), lambda live: live is None, "the deleted training ending on the device")
        read = client.get(created["links"]["self"])
        model = client.get("/users/alice/model").json()["model"]

    assert deleted.status_code == 204 and read.status_code == 404
    assert sample_files(training_settings) == []
    assert model == DEMO_MODEL


def test_a_finished_training_answers_a_cancel_with_409_and_keeps_its_model(training_settings, app_factory):
    with TestClient(app_factory(training_settings)) as client:
        created = start_training(client)
        ended = wait_for_training(client, created["training_id"])
        cancel = client.post(created["links"]["cancel"])
        model = client.get("/users/alice/model").json()["model"]

    assert ended["status"] == "succeeded" and cancel.status_code == 409
    assert model == ended["model"] and model["kind"] == "lora"
    assert len(sample_files(training_settings)) == 2


def test_a_training_waits_out_a_locked_database_and_loses_no_step(training_settings, app_factory, engine):
    training_settings.database_lock_timeout_s, training_settings.database_retry_s = 0.2, 0.5
    engine.slice_gate = threading.Semaphore(0)
    with TestClient(app_factory(training_settings)) as client:
        created = start_training(client)
        wait_for_training(client, created["training_id"], ("training",))
        lock = HeldLock(sqlite_file(training_settings))
        engine.slice_gate.release(100)  # every slice, both checkpoints and the commit meet the lock
        waiting = poll(lambda: client.get("/health").json()["parts"], lambda parts: parts["trainer"]["state"] == "failing", "the trainer waiting for the database")
        during = client.get(created["links"]["self"]).json()
        lock.release()
        ended = wait_for_training(client, created["training_id"])
        model = client.get("/users/alice/model").json()["model"]
        stored = client.get("/trainings").json()["trainings"][0]

    assert "database is unavailable" in waiting["trainer"]["detail"]
    assert during["status"] == "training" and during["progress"]["step"] == 20
    assert ended["status"] == "succeeded" and ended["progress"]["step"] == 20
    assert model == ended["model"] and stored["status"] == "succeeded"


@pytest.fixture
def held_decoding(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """Training photos decode only once the returned event is set; the list names each photo as its decoding starts."""
    gate, started = threading.Event(), []
    prepare = trainings_route.prepare_photo

    def held(photo, *args):
        started.append(photo.name)
        gate.wait(DEADLINE_S)
        return prepare(photo, *args)

    monkeypatch.setattr(trainings_route, "prepare_photo", held)
    return gate, started


def in_threads(calls: list[Callable[[], object]]) -> tuple[list[threading.Thread], list]:
    """Start each call on a thread of its own; the threads, and the list their results are appended to."""
    results: list = []
    threads = [threading.Thread(target=lambda call=call: results.append(call())) for call in calls]
    for thread in threads:
        thread.start()
    return threads, results


def test_one_user_sending_six_uploads_at_once_has_five_refused_before_any_is_decoded(training_settings, app_factory, held_decoding):
    gate, started = held_decoding
    with TestClient(app_factory(training_settings)) as client:
        post = lambda seed: client.post("/users/alice/trainings", files=photo_files(seed=seed), data=FIELDS).status_code  # noqa: E731
        threads, statuses = in_threads([lambda seed=seed: post(seed) for seed in range(0, 60, 10)])
        poll(lambda: sorted(statuses), lambda seen: seen == [429] * 5, "five uploads refused while the first decodes")
        decoding_meanwhile = len(started)
        gate.set()
        for thread in threads:
            thread.join(DEADLINE_S)

    assert sorted(statuses) == [202] + [429] * 5
    assert decoding_meanwhile == 1  # only the first upload's first photo ever started to decode


def test_uploads_that_fill_the_decoding_pool_hold_up_no_other_request(training_settings, app_factory, held_decoding, small_request):
    gate, started = held_decoding
    training_settings.decode_threads = 1
    with TestClient(app_factory(training_settings)) as client:
        uploads = [lambda user=user: client.post(f"/users/{user}/trainings", files=photo_files(), data=FIELDS) for user in ("alice", "bob", "default")]
        threads, answers = in_threads(uploads)
        poll(lambda: len(started), lambda count: count == 1, "the one decoding thread busy with an upload")
        listing, generation, model = client.get("/jobs"), client.post("/generate", json=small_request()), client.get("/users/bob/model")
        busy = len(started)
        gate.set()
        for thread in threads:
            thread.join(DEADLINE_S)

    assert (listing.status_code, generation.status_code, model.status_code) == (200, 200, 200)
    assert busy == 1  # the other uploads waited for the decoding thread, not the requests above
    assert sorted(answer.status_code for answer in answers) == [202, 202, 202]


def test_a_training_and_a_job_outlive_a_15_s_database_lock_through_the_one_writer(training_settings, app_factory, engine, small_request):
    training_settings.database_lock_timeout_s, training_settings.database_retry_s = 0.2, 0.5
    engine.slice_gate, engine.step_gate = threading.Semaphore(0), threading.Semaphore(0)
    with TestClient(app_factory(training_settings)) as client:
        job_id = client.post("/jobs", json=small_request(num_inference_steps=3)).json()["job_id"]
        created = start_training(client)
        wait_for(client, job_id, "running")
        lock, locked_at = HeldLock(sqlite_file(training_settings)), time.monotonic()
        engine.step_gate.release(100)
        engine.slice_gate.release(100)  # every slice, both checkpoints and the commit meet the lock
        job_during = wait_for(client, job_id)  # the live job ends; its end waits in the writer
        parts = poll(lambda: client.get("/health").json()["parts"], lambda parts: parts["trainer"]["state"] == "failing", "the trainer waiting for the database")
        training_during = client.get(created["links"]["self"]).json()
        ready_during = client.get("/health/ready").status_code
        time.sleep(max(0.0, 15 - (time.monotonic() - locked_at)))  # the lock is held for 15 s in all
        lock.release()
        training = wait_for_training(client, created["training_id"])
        stored = {row["training_id"]: row["status"] for row in client.get("/trainings").json()["trainings"]}
        job = client.get(f"/jobs/{job_id}").json()

    assert job_during["status"] == "succeeded" and job["status"] == "succeeded"
    assert stored_job_status(training_settings, job_id) == "succeeded"
    assert training_during["status"] == "training" and training_during["progress"]["step"] == 20
    assert "database is unavailable" in parts["trainer"]["detail"] and ready_during == 503
    assert training["status"] == "succeeded" and training["progress"]["step"] == 20
    assert stored[created["training_id"]] == "succeeded"


def stored_job_status(settings, job_id: str) -> str:
    """The job's status as the database has it (not the live record)."""
    with sqlite3.connect(sqlite_file(settings)) as connection:
        return connection.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_a_training_gets_its_share_of_a_device_that_generations_keep_busy(training_settings, app_factory, gated, small_request, share):
    training_settings.training_share, training_settings.max_batch_size = share, 1
    with TestClient(app_factory(training_settings)) as client:
        jobs = [post_job(client, small_request, seed=seed) for seed in range(10)]
        wait_for(client, jobs[0], "running")
        training = start_training(client)
        gated.release(10_000)
        ended = wait_for_training(client, training["training_id"])
        started = [wait_for(client, job_id)["started_at"] for job_id in jobs]

    assert ended["status"] == "succeeded"
    jobs_before = sum(started_at < ended["finished_at"] for started_at in started)
    if share:
        assert jobs_before < len(jobs) - 1, f"the training ended after {jobs_before} of {len(jobs)} jobs"
    else:
        assert jobs_before == len(jobs)  # it waited for every ready batch
