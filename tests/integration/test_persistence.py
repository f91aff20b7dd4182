"""Durable jobs through the API: history, restarts and retention, on SQLite and (when a server answers) PostgreSQL."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from helpers import SLOW, poll, wait_for, wait_until_running
from sd_server.app import create_app
from sd_server.domain.jobs import utc_now


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every persistence test runs on SQLite and on PostgreSQL."""
    return both_databases


def test_history_api_pages_with_next_cursor_and_filters(client, small_request):
    ids = [client.post("/jobs", json=small_request(seed=seed)).json()["job_id"] for seed in range(3)]
    for job_id in ids:
        wait_for(client, job_id)
    # A job's end is stored just after it is visible on the job itself: the history follows within moments.
    poll(lambda: client.get("/jobs", params={"status": "succeeded"}).json()["total"], lambda total: total == 3, "the history listing 3 succeeded jobs")

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
        queue = client.app.state.services.jobs
        old, new = (wait_for(client, client.post("/jobs", json=small_request(seed=seed)).json()["job_id"]) for seed in (1, 2))
        aged = queue.store.get(old["job_id"])
        aged.finished_at = utc_now() - timedelta(days=2)
        queue.store.save(aged)

        assert client.app.state.services.retention.apply() == 1
        assert client.get(f"/jobs/{old['job_id']}").status_code == 404
        assert client.get(old["result"]["image_url"]).status_code == 404
        assert client.get(f"/jobs/{new['job_id']}").json()["status"] == "succeeded"
        assert client.get(new["result"]["image_url"]).status_code == 200


def test_retention_runs_periodically_when_enabled(settings, small_request):
    settings.retention_days, settings.retention_interval_s = 1, 0.1
    with TestClient(create_app(settings)) as client:
        queue = client.app.state.services.jobs
        job = queue.store.get(wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])["job_id"])
        job.finished_at = utc_now() - timedelta(days=2)
        queue.store.save(job)
        poll(lambda: client.get(f"/jobs/{job.id}").status_code, lambda status: status == 404, "the retention task deleting the job")


