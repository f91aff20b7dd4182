"""The app under a real uvicorn: the event loop stays free while the device works, streams, disconnects, races."""

import threading

import httpx
import numpy as np
import pytest
import uvicorn

from helpers import DEADLINE_S, SLOW, free_port, pixels, poll
from sd_server.app import create_app
from sd_server.jobs.submission import Jobs


def test_health_answers_while_a_generation_runs(live_server, small_request, hold_generation):
    generation = threading.Thread(target=lambda: httpx.post(f"{live_server}/generate", json=small_request(), timeout=DEADLINE_S))
    generation.start()
    assert hold_generation.entered.wait(DEADLINE_S), "the generation never reached the pipeline"

    health = httpx.get(f"{live_server}/health", timeout=DEADLINE_S)

    assert health.status_code == 200 and health.json()["queue"]["running"] == 1
    assert generation.is_alive(), "the generation ended before /health answered"
    hold_generation.set()
    generation.join()


def test_health_answers_under_a_queue_of_20_jobs(live_server, small_request, hold_generation):
    for seed in range(20):
        assert httpx.post(f"{live_server}/jobs", json=small_request(seed=seed)).status_code == 202
    assert hold_generation.entered.wait(DEADLINE_S), "no job reached the pipeline"

    health = [httpx.get(f"{live_server}/health", timeout=DEADLINE_S).json() for _ in range(5)]

    assert all(answer["status"] == "ok" and answer["queue"]["queued"] >= 15 for answer in health), health


def test_client_that_disconnects_cancels_its_sync_job(live_server, small_request, hold_generation, monkeypatch):
    cancel, cancelled = Jobs.cancel, threading.Event()
    monkeypatch.setattr(Jobs, "cancel", lambda jobs, job: (cancel(jobs, job), cancelled.set()))
    with pytest.raises(httpx.ReadTimeout):  # gives up after 1 s, while the generation is held
        httpx.post(f"{live_server}/generate", json=small_request(), timeout=1.0)

    assert cancelled.wait(DEADLINE_S), "the server did not cancel the job of the client that left"
    hold_generation.set()  # the job stops at its next step

    job = poll(lambda: httpx.get(f"{live_server}/jobs").json()["jobs"][0], lambda job: job["status"] == "cancelled", "the job cancelled")
    assert job["result"] is None


def test_two_concurrent_first_requests_load_the_model_once(live_server, small_request, load_calls):
    results: list[httpx.Response] = []

    def post() -> None:
        results.append(httpx.post(f"{live_server}/generate", json=small_request(), timeout=DEADLINE_S))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [response.status_code for response in results] == [200, 200]
    assert len(load_calls) == 1
    assert np.array_equal(pixels(results[0].json()["image_base64"]), pixels(results[1].json()["image_base64"]))


def test_event_stream_of_a_cancelled_job_ends_with_cancelled(live_server, small_request):
    job_id = httpx.post(f"{live_server}/jobs", json=small_request(**SLOW)).json()["job_id"]
    names = []
    with httpx.stream("GET", f"{live_server}/jobs/{job_id}/events", timeout=DEADLINE_S) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
                if names[-1] == "progress" and names.count("progress") == 2:
                    httpx.post(f"{live_server}/jobs/{job_id}/cancel")

    assert names[-1] == "cancelled" and names.count("progress") < 60




def test_concurrent_retries_with_one_idempotency_key_make_one_job(live_server, small_request):
    headers = {"Idempotency-Key": "racing-retry"}
    responses: list[httpx.Response] = []

    def post() -> None:
        responses.append(httpx.post(f"{live_server}/jobs", json=small_request(), headers=headers, timeout=DEADLINE_S))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [response.status_code for response in responses] == [202] * 6
    assert len({response.json()["job_id"] for response in responses}) == 1


def test_graceful_shutdown_lets_the_running_job_finish_and_keeps_queued_ones(settings, small_request, hold_generation):
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started, bool, "uvicorn starting")
    url = f"http://127.0.0.1:{port}"
    running = httpx.post(f"{url}/jobs", json=small_request()).json()["job_id"]
    assert hold_generation.entered.wait(DEADLINE_S), "the job never reached the pipeline"
    queued = httpx.post(f"{url}/jobs", json=small_request(num_inference_steps=3)).json()["job_id"]

    server.should_exit = True
    poll(lambda: getattr(app.state, "shutting_down", False), bool, "the shutdown starting")
    hold_generation.set()  # the running batch finishes during the shutdown
    thread.join(timeout=DEADLINE_S)

    store = app.state.services.jobs.store
    assert store.get(running).status.value == "succeeded"
    assert store.get(queued).status.value == "queued"
