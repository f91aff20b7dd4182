"""Kill and restart: a job running when the process dies by SIGKILL is queued again once, and loses no image; a
training resumes from its last checkpoint, once."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from helpers import (
    DEADLINE_S,
    PROJECT_DIR,
    SLOW,
    free_port,
    png_bytes,
    poll,
    read_job,
    wait_until_healthy,
)


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every restart test runs on SQLite and on PostgreSQL."""
    return both_databases


def start_server(models_dir, tmp_path, database_url: str, **overrides: str) -> tuple[subprocess.Popen, str]:
    """`python main.py` on the demo model and the given database (with settings ``overrides``, e.g.
    SD_TRAINING_CHECKPOINT_EVERY); returns the process and its URL."""
    port = free_port()
    environment = {
        **os.environ,
        "SD_DEFAULT_MODEL": "demo",
        "SD_MODELS_DIR": str(models_dir),
        "SD_OUTPUT_DIR": str(tmp_path / "output"),
        "SD_DATA_DIR": str(tmp_path / "data"),
        "SD_DATABASE_URL": database_url,
        "SD_PORT": str(port),
        "SD_HOST": "127.0.0.1",
        "SD_RATE_LIMIT": "",  # the test polls; rate limits have tests of their own
        **overrides,
    }
    process = subprocess.Popen([sys.executable, "main.py"], cwd=PROJECT_DIR, env=environment)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, process)
    return process, url


def wait_for_status(url: str, job_id: str, statuses: set[str]) -> dict:
    """Poll a live server until the job is in one of ``statuses`` (running: with a step done)."""
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        return poll(
            lambda: read_job(client, job_id),
            lambda job: job["status"] in statuses and (job["status"] != "running" or job["progress"]["step"] >= 1),
            f"job {job_id} reaching {statuses}",
            interval=0.25,
        )


def kill(process: subprocess.Popen) -> None:
    """SIGKILL: no shutdown code runs."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=DEADLINE_S)


def test_sigkill_mid_run_requeues_the_running_job_once_and_loses_no_image(models_dir, tmp_path, database_url):
    process, url = start_server(models_dir, tmp_path, database_url)
    running = httpx.post(f"{url}/jobs", json={"prompt": "a", **SLOW}).json()["job_id"]
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
    process, url = start_server(models_dir, tmp_path, database_url)
    job_id = httpx.post(f"{url}/jobs", json={"prompt": "a", **SLOW}).json()["job_id"]
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


def read_training(url: str, training_id: str) -> dict:
    """The training as a live server shows it."""
    return httpx.get(f"{url}/trainings/{training_id}", timeout=DEADLINE_S).json()


def test_sigkill_mid_training_resumes_from_the_last_checkpoint_and_a_second_crash_there_fails_it(models_dir, tmp_path, database_url):
    photos = [("images", (f"{index}.png", png_bytes(seed=index), "image/png")) for index in range(3)]
    fields = {"steps": "3000", "resolution": "64", "rank": "4", "caption": "a {trigger}", "class_word": "shape"}
    process, url = start_server(models_dir, tmp_path, database_url, SD_TRAINING_CHECKPOINT_EVERY="10", SD_TRAINING_MIN_PHOTO_SIDE="64")
    training_id = httpx.post(f"{url}/users/default/trainings", files=photos, data=fields, timeout=DEADLINE_S).json()["training_id"]
    poll(lambda: read_training(url, training_id), lambda training: training["progress"]["step"] >= 15, "the training passing step 15")
    kill(process)

    # No checkpoint in this run: a crash in it happens at the same point as the first.
    process, url = start_server(models_dir, tmp_path, database_url, SD_TRAINING_CHECKPOINT_EVERY="100000", SD_TRAINING_MIN_PHOTO_SIDE="64")
    resumed = poll(lambda: read_training(url, training_id), lambda training: training["status"] == "training", "the training resuming")
    assert resumed["progress"]["step"] >= 10, "the training started again from zero, not from its checkpoint"
    kill(process)

    process, url = start_server(models_dir, tmp_path, database_url)
    try:
        failed = poll(lambda: read_training(url, training_id), lambda training: training["status"] == "failed", "the training failing")
        assert "stopped twice" in failed["error"]
    finally:
        kill(process)
