"""Trainings on the fake engine, where a test can hold a training at any point: a cancel or a delete that meets the
end of a training, a database that is away while one runs, and uploads that cannot hold up anyone else (one
training per user is refused before any decoding; decoding has threads of its own)."""

import io
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers import DEADLINE_S, HeldLock, follow_events, png_bytes, poll, post_job, sqlite_file, wait_for
from sd_server.api.routes import trainings as trainings_route

FIELDS = {"steps": "20", "resolution": "64", "class_word": "shape"}  # random pixels: no face to look for
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


# --- what a training runs with, and what it tells while it runs ---------------------------------------------


@pytest.fixture
def recipe_settings(training_settings, tmp_path):
    """The default model `demo` in a models folder of its own, carrying a training recipe."""
    training_settings.models_dir = tmp_path / "models"
    (training_settings.models_dir / "demo").mkdir(parents=True)
    recipe = {"class_word": "shape", "steps": 12, "rank": 4, "resolution": 64, "sample_templates": ["a {trigger} {class_word} on black"]}
    (training_settings.models_dir / "demo" / "training_defaults.json").write_text(json.dumps(recipe))
    return training_settings


def test_a_training_takes_what_the_upload_leaves_out_from_its_base_models_recipe_and_says_so(recipe_settings, app_factory):
    with TestClient(app_factory(recipe_settings)) as client:
        response = client.post("/users/alice/trainings", files=photo_files(), data={"rank": "8"})
        ended = wait_for_training(client, response.json()["training_id"])

    assert response.status_code == 202, response.text
    settings = ended["settings"]
    assert (settings["class_word"], settings["steps"], settings["resolution"]) == ("shape", 12, 64)  # the recipe's
    assert settings["rank"] == 8 and settings["learning_rate"] == 1e-4  # the upload's, and the built-in default
    assert settings["sample_templates"] == ["a {trigger} {class_word} on black"]
    assert settings["defaults_from"] == "demo/training_defaults.json"
    assert ended["status"] == "succeeded" and ended["progress"]["total"] == 12


def test_a_base_without_a_recipe_trains_with_the_built_in_defaults(training_settings, app_factory):
    with TestClient(app_factory(training_settings)) as client:
        ended = wait_for_training(client, start_training(client)["training_id"])

    assert ended["settings"]["defaults_from"].startswith("built-in") and ended["settings"]["rank"] == 8


@pytest.mark.parametrize("recipe", [json.dumps({"steps": 0}), "{not json", json.dumps(["steps", 10])])
def test_a_broken_recipe_is_the_operators_error_named_in_a_503_and_no_training_starts(recipe_settings, app_factory, recipe):
    (recipe_settings.models_dir / "demo" / "training_defaults.json").write_text(recipe)
    with TestClient(app_factory(recipe_settings)) as client:
        response = client.post("/users/alice/trainings", files=photo_files(), data=FIELDS)
        listed = client.get("/trainings").json()

    assert response.status_code == 503 and "training_defaults.json is not a valid recipe" in response.json()["detail"]
    assert listed["total"] == 0


def test_a_persons_photos_without_a_face_get_422_listing_them_unless_the_check_is_off(training_settings, app_factory):
    with TestClient(app_factory(training_settings)) as client:
        refused = client.post("/users/alice/trainings", files=photo_files(), data={**FIELDS, "class_word": "woman"})
        accepted = client.post("/users/alice/trainings", files=photo_files(), data={**FIELDS, "class_word": "woman", "face_check": "false"})

    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "images"]
    assert "no face found in photo-0.png, photo-1.png, photo-2.png" in refused.json()["detail"][0]["msg"]
    assert accepted.status_code == 202, accepted.text


def test_near_duplicate_photos_are_left_out_and_listed_in_the_trainings_warnings(training_settings, app_factory):
    photo = Image.open(io.BytesIO(png_bytes(7, 64)))
    again = io.BytesIO()
    photo.save(again, format="JPEG", quality=90)
    files = [*photo_files(), ("images", ("photo-0-again.jpg", again.getvalue(), "image/jpeg"))]
    files[0] = ("images", ("photo-0.png", png_bytes(7, 64), "image/png"))
    with TestClient(app_factory(training_settings)) as client:
        created = client.post("/users/alice/trainings", files=files, data=FIELDS).json()
        ended = wait_for_training(client, created["training_id"])

    assert created["photos"] == 3 and ended["photos"] == 3
    assert ended["warnings"] == ["photo-0-again.jpg: a near-duplicate of photo-0.png, left out"]


def test_a_running_training_draws_samples_every_so_many_steps_and_streams_them(training_settings, app_factory, engine):
    training_settings.training_sample_every = 10
    engine.slice_gate = threading.Semaphore(0)
    with TestClient(app_factory(training_settings)) as client:
        created = start_training(client)
        reader, begun, events = follow_events(client, created["links"]["events"])
        assert begun.wait(DEADLINE_S), "the event stream never began"
        engine.slice_gate.release(100)
        reader.join(DEADLINE_S)
        ended = wait_for_training(client, created["training_id"])
        at_ten = client.get(f"{created['links']['self']}/samples/1?step=10")
        never = client.get(f"{created['links']['self']}/samples/0?step=5")

    sampled = [data for name, data in events if name == "samples"]
    assert sampled == [{"step": 10, "samples": [f"/trainings/{created['training_id']}/samples/{index}?step=10" for index in range(2)]}]
    assert ended["progress_samples"] == sampled, ended  # the final ones are `samples`, not a progress row
    assert len(ended["samples"]) == 2
    assert at_ten.status_code == 200 and at_ten.headers["content-type"] == "image/png"
    assert never.status_code == 404 and "steps with samples: 10" in never.json()["detail"]


def test_a_cancelled_training_removes_the_samples_it_drew_while_running(training_settings, app_factory, engine):
    training_settings.training_sample_every = 5
    engine.slice_gate = threading.Semaphore(0)
    with TestClient(app_factory(training_settings)) as client:
        created = start_training(client)
        engine.slice_gate.release(2)
        poll(lambda: client.get(created["links"]["self"]).json(), lambda training: len(training["progress_samples"]) >= 1, "samples at step 5")
        client.post(created["links"]["cancel"])
        engine.slice_gate.release(100)
        ended = wait_for_training(client, created["training_id"])

    assert ended["status"] == "cancelled" and ended["progress_samples"] == []
    assert sample_files(training_settings) == []


def test_a_trainings_preparation_runs_a_piece_a_slice_and_a_generation_need_not_wait_for_all_of_it(
    training_settings, app_factory, engine, small_request
):
    engine.preparation_pieces, engine.prepare_gate = 3, threading.Semaphore(0)  # three slices of class pictures to draw
    training_settings.training_share = 0  # a ready batch always goes first
    with TestClient(app_factory(training_settings)) as client:
        created = start_training(client)
        wait_for_training(client, created["training_id"], ("preparing",))
        job_id = post_job(client, small_request)
        engine.prepare_gate.release(1)
        job = wait_for(client, job_id)
        during, pieces_by_then = client.get(created["links"]["self"]).json(), engine.prepared_pieces
        engine.prepare_gate.release(10)
        ended = wait_for_training(client, created["training_id"])

    assert job["status"] == "succeeded" and pieces_by_then <= 1  # it ran between pieces, not after the whole preparation
    assert during["status"] == "preparing" and during["progress"]["step"] == 0
    assert ended["status"] == "succeeded" and engine.prepared_pieces == 4
