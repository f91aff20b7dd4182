"""Kill and restart: a job running when the process dies by SIGKILL is queued again once, and loses no image."""

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
    poll,
    read_job,
    wait_until_healthy,
)


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every restart test runs on SQLite and on PostgreSQL."""
    return both_databases


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
        "SD_RATE_LIMIT": "",  # the test polls; rate limits have tests of their own
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
