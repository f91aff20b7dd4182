"""Durable jobs: migrations, the SQL job store, history queries, restart and kill recovery, retention.

Every test runs on SQLite and, when a server is reachable, on PostgreSQL.
"""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import httpx
import pytest
import sqlalchemy
from fastapi.testclient import TestClient

from conftest import PROJECT_DIR, free_port
from database import create_database_engine, migrate
from job_store import SqlJobStore
from jobs import Job, JobQuery, StoredImage, utc_now
from main import create_app
from schemas import GenerateRequest, JobStatus
from test_end_to_end import wait_until_healthy
from test_jobs import SLOW, wait_for, wait_until_running


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every persistence test runs on SQLite and on PostgreSQL."""
    return both_databases


@pytest.fixture
def store(database_url: str) -> SqlJobStore:
    """A migrated, empty job store."""
    migrate(database_url)
    engine = create_database_engine(database_url)
    yield SqlJobStore(engine)
    engine.dispose()


def make_job(user_id: str = "default", **fields) -> Job:
    """A job record as the queue makes them."""
    request = GenerateRequest(prompt="a photo of sks person", user_id=user_id, num_inference_steps=2, width=256, height=256)
    return Job(request, "demo", 7, synchronous=False, **fields)


def test_migrations_create_every_table_from_an_empty_database(database_url):
    migrate(database_url)
    migrate(database_url)  # a second run is a no-op

    engine = create_database_engine(database_url)
    inspector = sqlalchemy.inspect(engine)
    assert {"jobs", "job_images", "api_keys", "user_models", "alembic_version"} <= set(inspector.get_table_names())
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
        if engine.dialect.name == "sqlite":
            assert connection.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_a_finished_job_is_stored_with_every_parameter_and_its_images(store):
    job = make_job(webhook_url="http://hooks.example/x", idempotency_key="default:k1", fingerprint="f" * 64)
    store.add(job)
    job.status, job.started_at, job.finished_at = JobStatus.succeeded, utc_now(), utc_now()
    job.scheduler_used, job.batch_size, job.step, job.generation_seconds = "pndm", 2, 3, 1.25
    job.images = [StoredImage(7, "a.png", 123, "0" * 64), StoredImage(8, "b.png", 456, "1" * 64)]
    store.save(job)

    loaded = SqlJobStore(store.engine).get(job.id)  # a fresh store: read from the database

    assert loaded is not job
    assert loaded.request.model_dump(exclude={"seed"}) == job.request.model_dump(exclude={"seed"})
    assert loaded.seed == 7 and loaded.status is JobStatus.succeeded
    assert loaded.parameters == job.parameters and loaded.parameters.scheduler == "pndm"
    assert [(image.seed, image.key, image.size_bytes) for image in loaded.images] == [(7, "a.png", 123), (8, "b.png", 456)]
    assert loaded.created_at == job.created_at and loaded.finished_at == job.finished_at
    assert (loaded.batch_size, loaded.step, loaded.generation_seconds) == (2, 3, 1.25)
    assert loaded.webhook_url == job.webhook_url and loaded.finished.is_set()
    assert store.find_by_idempotency_key("default:k1").id == job.id


def test_history_filters_by_user_status_and_time(store):
    now = utc_now()
    old = make_job(user_id="alice", created_at=now - timedelta(days=2))
    failed = make_job(user_id="alice", status=JobStatus.failed)
    bob = make_job(user_id="bob")
    for job in (old, failed, bob):
        store.add(job)

    def ids(**filters) -> set[str]:
        return {job.id for job in store.page(JobQuery(**filters))[0]}

    assert ids(user_id="alice") == {old.id, failed.id}
    assert ids(status=JobStatus.failed) == {failed.id}
    assert ids(created_after=now - timedelta(days=1)) == {failed.id, bob.id}
    assert ids(created_before=now - timedelta(days=1)) == {old.id}


def test_cursor_pages_stay_stable_while_jobs_are_inserted(store):
    start = utc_now() - timedelta(hours=1)
    jobs = [make_job(created_at=start + timedelta(seconds=index)) for index in range(7)]
    for job in jobs:
        store.add(job)

    first, total, cursor = store.page(JobQuery(limit=3))
    for index in range(5):  # newer jobs arrive between page fetches
        store.add(make_job(created_at=utc_now() + timedelta(seconds=index)))
    second, _, cursor = store.page(JobQuery(limit=3, cursor=cursor))
    third, _, last_cursor = store.page(JobQuery(limit=3, cursor=cursor))

    newest_first = [job.id for job in reversed(jobs)]
    assert total == 7
    assert [job.id for job in first + second + third] == newest_first
    assert last_cursor is None


def test_history_api_pages_with_next_cursor_and_filters(client, small_request):
    ids = [client.post("/jobs", json=small_request(seed=seed)).json()["job_id"] for seed in range(3)]
    for job_id in ids:
        wait_for(client, job_id)

    first = client.get("/jobs", params={"limit": 2, "status": "succeeded"}).json()
    second = client.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"], "status": "succeeded"}).json()

    assert [job["job_id"] for job in first["jobs"] + second["jobs"]] == ids[::-1]
    assert second["next_cursor"] is None and first["total"] == 3
    assert client.get("/jobs", params={"cursor": "not-a-cursor"}).status_code == 422
    assert client.get("/jobs", params={"status": "sleeping"}).status_code == 422


def test_finished_jobs_and_their_images_survive_a_restart(settings, small_request):
    with TestClient(create_app(settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])

    with TestClient(create_app(settings)) as client:
        again = client.get(f"/jobs/{job['job_id']}").json()
        image = client.get(again["result"]["image_url"])

    assert again == job
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_queued_jobs_stay_queued_through_a_shutdown_and_run_after_the_restart(settings, small_request):
    with TestClient(create_app(settings)) as client:
        running = client.post("/jobs", json=small_request(**SLOW)).json()["job_id"]
        wait_until_running(client, running)
        queued = client.post("/jobs", json=small_request()).json()["job_id"]
        client.post(f"/jobs/{running}/cancel")

    with TestClient(create_app(settings)) as client:
        job = wait_for(client, queued)

    assert job["status"] == "succeeded"


def test_retention_deletes_old_jobs_and_images_and_keeps_new_ones(settings, small_request):
    settings.retention_days = 1
    with TestClient(create_app(settings)) as client:
        queue = client.app.state.job_queue
        old, new = (wait_for(client, client.post("/jobs", json=small_request(seed=seed)).json()["job_id"]) for seed in (1, 2))
        aged = queue.store.get(old["job_id"])
        aged.finished_at = utc_now() - timedelta(days=2)
        queue.store.save(aged)

        assert queue.apply_retention() == 1
        assert client.get(f"/jobs/{old['job_id']}").status_code == 404
        assert client.get(old["result"]["image_url"]).status_code == 404
        assert client.get(f"/jobs/{new['job_id']}").json()["status"] == "succeeded"
        assert client.get(new["result"]["image_url"]).status_code == 200


def test_retention_runs_periodically_when_enabled(settings, small_request):
    settings.retention_days, settings.retention_interval_s = 1, 0.1
    with TestClient(create_app(settings)) as client:
        queue = client.app.state.job_queue
        job = queue.store.get(wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])["job_id"])
        job.finished_at = utc_now() - timedelta(days=2)
        queue.store.save(job)
        deadline = time.monotonic() + 10
        while client.get(f"/jobs/{job.id}").status_code != 404:
            assert time.monotonic() < deadline, "the retention task did not run"
            time.sleep(0.05)


def start_server(models_dir, tmp_path, database_url: str) -> tuple[subprocess.Popen, str]:
    """`python main.py` on the demo model and the given database; returns the process and its URL."""
    port = free_port()
    environment = {
        **os.environ,
        "SD_DEFAULT_MODEL": "demo",
        "SD_MODELS_DIR": str(models_dir),
        "SD_OUTPUT_DIR": str(tmp_path / "output"),
        "SD_DATABASE_URL": database_url,
        "SD_PORT": str(port),
        "SD_HOST": "127.0.0.1",
    }
    process = subprocess.Popen([sys.executable, "main.py"], cwd=PROJECT_DIR, env=environment)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, process)
    return process, url


def wait_for_status(url: str, job_id: str, statuses: set[str], timeout: float = 60) -> dict:
    """Poll a live server until the job is in one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}").json()
        if job["status"] in statuses and (job["status"] != "running" or job["progress"]["step"] >= 1):
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id} never reached {statuses}: {job}")


def kill(process: subprocess.Popen) -> None:
    """SIGKILL: no shutdown code runs."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_sigkill_mid_run_requeues_the_running_job_once_and_loses_no_image(models_dir, tmp_path, database_url):
    process, url = start_server(models_dir, tmp_path, database_url)
    running = httpx.post(f"{url}/jobs", json={"prompt": "a", "num_inference_steps": 30, "width": 512, "height": 512}).json()["job_id"]
    wait_for_status(url, running, {"running"})
    queued = [httpx.post(f"{url}/jobs", json={"prompt": f"b{i}", "num_inference_steps": 2, "width": 256, "height": 256}).json()["job_id"] for i in range(2)]
    kill(process)

    process, url = start_server(models_dir, tmp_path, database_url)
    try:
        finished = [wait_for_status(url, job_id, {"succeeded", "failed"}) for job_id in [running, *queued]]
        assert [job["status"] for job in finished] == ["succeeded"] * 3
        for job in finished:  # no succeeded job points at a missing image
            assert all(httpx.get(f"{url}{image['url']}").status_code == 200 for image in job["result"]["images"])
    finally:
        kill(process)


def test_a_job_running_at_two_kills_is_failed_with_a_clear_error(models_dir, tmp_path, database_url):
    slow = {"prompt": "a", "num_inference_steps": 60, "width": 512, "height": 512}
    process, url = start_server(models_dir, tmp_path, database_url)
    job_id = httpx.post(f"{url}/jobs", json=slow).json()["job_id"]
    wait_for_status(url, job_id, {"running"})
    kill(process)
    process, url = start_server(models_dir, tmp_path, database_url)
    wait_for_status(url, job_id, {"running"})  # re-queued once, running again
    kill(process)

    process, url = start_server(models_dir, tmp_path, database_url)
    try:
        job = httpx.get(f"{url}/jobs/{job_id}").json()
        assert job["status"] == "failed" and "stopped twice" in job["error"]
    finally:
        kill(process)
