"""The job queue on the real pipeline: async jobs, cross-request batching, cancel, SSE, idempotency, webhooks."""

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers import (
    SLOW,
    SilentReceiver,
    WebhookReceiver,
    parse_sse,
    pixels,
    poll,
    wait_for,
    wait_until_running,
)
from sd_server.app import create_app


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every job test runs on SQLite and on PostgreSQL."""
    return both_databases


def image_pixels(client, job: dict, index: int = 0) -> np.ndarray:
    """The pixels of a finished job's image, fetched by its URL."""
    response = client.get(job["result"]["images"][index]["url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return pixels(base64.b64encode(response.content).decode())


@pytest.fixture
def batching_client(settings):
    """A client whose queue waits 300 ms for companions, so jobs posted together are batched."""
    settings.batch_wait_ms = 300
    with TestClient(create_app(settings)) as client:
        yield client


def test_post_jobs_answers_202_with_location_and_the_job_runs_to_a_result(client, small_request):
    response = client.post("/jobs", json=small_request(seed=11, num_images=2, scheduler="ddim"))

    assert response.status_code == 202
    created = response.json()
    assert response.headers["Location"] == f"/jobs/{created['job_id']}" == created["links"]["self"]
    assert created["status"] == "queued" and created["position"] == 1
    job = wait_for(client, created["job_id"])
    assert job["status"] == "succeeded" and job["error"] is None
    assert job["progress"] == {"step": 2, "total": 2}
    assert job["batch_size"] == 2 and job["started_at"] and job["finished_at"]
    result = job["result"]
    assert [image["seed"] for image in result["images"]] == [11, 12]
    assert result["image_url"] == result["images"][0]["url"] and result["parameters"]["seed"] == 11
    assert "image_base64" not in json.dumps(result)
    assert all(image.png == b"" for image in client.app.state.services.jobs.get(created["job_id"]).images)


def test_async_job_images_are_stored_even_when_sync_saving_is_off(settings, small_request):
    settings.save_images = False
    with TestClient(create_app(settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])

        assert client.get(job["result"]["image_url"]).status_code == 200


def test_job_image_is_the_image_post_generate_gives(client, small_request):
    job = wait_for(client, client.post("/jobs", json=small_request(seed=3)).json()["job_id"])
    direct = client.post("/generate", json=small_request(seed=3)).json()

    assert np.array_equal(image_pixels(client, job), pixels(direct["image_base64"]))


def test_compatible_jobs_are_batched_and_each_image_equals_its_image_alone(batching_client, small_request):
    client = batching_client
    ids = [client.post("/jobs", json=small_request(seed=seed, prompt=f"photo {seed}")).json()["job_id"] for seed in (1, 2, 3)]
    batched = [wait_for(client, job_id) for job_id in ids]

    assert [job["batch_size"] for job in batched] == [3, 3, 3]
    for seed, job in zip((1, 2, 3), batched):
        alone = client.post("/generate", json=small_request(seed=seed, prompt=f"photo {seed}")).json()
        # A batched convolution may round the last bit differently: at most 1 level of 255 apart.
        assert np.abs(image_pixels(client, job) - pixels(alone["image_base64"])).max() <= 2


def test_jobs_of_different_shapes_are_not_batched_together(batching_client, small_request):
    client = batching_client
    requests = [small_request(), small_request(num_inference_steps=3), small_request(width=264), small_request(guidance_scale=5.0), small_request(scheduler="ddim")]
    ids = [client.post("/jobs", json=request).json()["job_id"] for request in requests]

    assert [wait_for(client, job_id)["batch_size"] for job_id in ids] == [1, 1, 1, 1, 1]


def test_batches_hold_at_most_max_batch_size_images(settings, small_request):
    settings.batch_wait_ms, settings.max_batch_size = 300, 3
    with TestClient(create_app(settings)) as client:
        ids = [client.post("/jobs", json=small_request(seed=seed, num_images=2)).json()["job_id"] for seed in range(3)]
        sizes = [wait_for(client, job_id)["batch_size"] for job_id in ids]

    assert sizes == [2, 2, 2]  # 2 + 2 > 3: each job runs alone


def test_full_queue_answers_429_with_retry_after(settings, small_request):
    settings.max_queue = 2
    with TestClient(create_app(settings)) as client:
        running = client.post("/jobs", json=small_request(**SLOW)).json()["job_id"]
        wait_until_running(client, running)
        queued = [client.post("/jobs", json=small_request()).json() for _ in range(2)]

        response = client.post("/jobs", json=small_request())
        sync_response = client.post("/generate", json=small_request())

        assert [job["position"] for job in queued] == [1, 2]
        assert response.status_code == 429 and sync_response.status_code == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert "SD_MAX_QUEUE" in response.json()["detail"]
        client.post(f"/jobs/{running}/cancel")


def test_cancel_a_queued_job_takes_it_off_the_queue_at_once(client, small_request):
    running = client.post("/jobs", json=small_request(**SLOW)).json()["job_id"]
    wait_until_running(client, running)
    queued = client.post("/jobs", json=small_request()).json()["job_id"]

    response = client.post(f"/jobs/{queued}/cancel")

    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.get("/health").json()["queue"]["queued"] == 0
    client.post(f"/jobs/{running}/cancel")
    assert wait_for(client, queued)["started_at"] is None


def test_cancel_a_running_job_stops_it_at_its_next_step(client, small_request):
    job_id = client.post("/jobs", json=small_request(**SLOW)).json()["job_id"]
    wait_until_running(client, job_id)

    client.post(f"/jobs/{job_id}/cancel")
    job = wait_for(client, job_id)

    assert job["status"] == "cancelled" and job["result"] is None
    assert job["progress"]["step"] < 60 <= job["progress"]["total"]


def test_cancel_in_a_batch_stops_that_job_and_its_companions_finish(batching_client, small_request):
    client = batching_client
    slow = {**SLOW, "num_inference_steps": 30}
    ids = [client.post("/jobs", json=small_request(seed=seed, **slow)).json()["job_id"] for seed in (1, 2)]
    wait_until_running(client, ids[0])

    client.post(f"/jobs/{ids[0]}/cancel")

    assert wait_for(client, ids[0])["status"] == "cancelled"
    companion = wait_for(client, ids[1])
    assert companion["status"] == "succeeded" and companion["batch_size"] == 2


def test_cancel_a_finished_job_answers_409(client, small_request):
    job_id = client.post("/jobs", json=small_request()).json()["job_id"]
    wait_for(client, job_id)

    response = client.post(f"/jobs/{job_id}/cancel")

    assert response.status_code == 409 and "succeeded" in response.json()["detail"]


def test_unknown_job_answers_404_on_every_job_route(client):
    assert client.get("/jobs/nope").status_code == 404
    assert client.get("/jobs/nope/events").status_code == 404
    assert client.post("/jobs/nope/cancel").status_code == 404
    assert client.delete("/jobs/nope").status_code == 404


def test_delete_job_removes_it_and_its_images(client, small_request):
    job = wait_for(client, client.post("/jobs", json=small_request(num_images=2)).json()["job_id"])
    urls = [image["url"] for image in job["result"]["images"]]

    assert client.delete(f"/jobs/{job['job_id']}").status_code == 204
    assert client.get(f"/jobs/{job['job_id']}").status_code == 404
    assert [client.get(url).status_code for url in urls] == [404, 404]


def test_delete_an_active_job_cancels_it(client, small_request):
    job_id = client.post("/jobs", json=small_request(**SLOW)).json()["job_id"]
    wait_until_running(client, job_id)

    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert client.post("/generate", json=small_request()).status_code == 200  # the worker moved on


def test_event_stream_reports_queued_started_each_step_then_succeeded_and_ends(client, small_request):
    job_id = client.post("/jobs", json=small_request(num_inference_steps=4, scheduler="ddim")).json()["job_id"]

    response = client.get(f"/jobs/{job_id}/events")

    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names[0] in ("queued", "started")
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3, 4][-names.count("progress"):]
    assert "started" in names and names.index("started") < names.index("succeeded")
    assert events[-1][1]["result"]["images"][0]["url"]


def test_late_subscriber_gets_the_final_state_and_the_stream_ends(client, small_request):
    job_id = client.post("/jobs", json=small_request()).json()["job_id"]
    wait_for(client, job_id)

    events = parse_sse(client.get(f"/jobs/{job_id}/events").text)

    assert [name for name, _ in events] == ["succeeded"]
    assert events[0][1]["job_id"] == job_id


def test_same_idempotency_key_and_body_return_the_same_job(client, small_request):
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/jobs", json=small_request(), headers=headers)
    again = client.post("/jobs", json=small_request(), headers=headers)

    assert first.json()["job_id"] == again.json()["job_id"]
    assert client.get("/jobs").json()["total"] == 1


def test_same_idempotency_key_with_another_body_answers_409(client, small_request):
    client.post("/jobs", json=small_request(), headers={"Idempotency-Key": "order-42"})

    response = client.post("/jobs", json=small_request(prompt="another"), headers={"Idempotency-Key": "order-42"})

    assert response.status_code == 409 and "order-42" in response.json()["detail"]


def test_list_jobs_is_newest_first_and_paginated(client, small_request):
    ids = [client.post("/jobs", json=small_request(seed=seed)).json()["job_id"] for seed in range(5)]
    client.post("/jobs", json=small_request(user_id="bob"))

    first_page = client.get("/jobs", params={"limit": 2, "user_id": "default"}).json()
    second_page = client.get("/jobs", params={"limit": 2, "cursor": first_page["next_cursor"], "user_id": "default"}).json()

    assert first_page["total"] == 5
    assert [job["job_id"] for job in first_page["jobs"] + second_page["jobs"]] == ids[::-1][:4]
    assert client.get("/jobs").json()["total"] == 6


def test_post_jobs_validates_like_generate(client, small_request):
    assert client.post("/jobs", json=small_request(width=300)).status_code == 422
    assert client.post("/jobs", json=small_request(webhook_url="not a url")).json()["detail"][0]["loc"] == ["body", "webhook_url"]
    assert client.post("/jobs", json=small_request(user_id="mallory")).status_code == 404


def test_images_route_answers_404_for_unknown_and_refuses_other_paths(client):
    assert client.get("/images/nothing-here.png").status_code == 404
    assert client.get("/images/..%2Fconfig.py").status_code in (404, 422)


def test_job_past_its_timeout_fails_with_504(settings, small_request):
    settings.job_timeout_s = 1.0
    with TestClient(create_app(settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request(**SLOW)).json()["job_id"])
        sync = client.post("/generate", json=small_request(**SLOW))

    assert job["status"] == "failed" and "SD_JOB_TIMEOUT_S" in job["error"]
    assert sync.status_code == 504


def test_worker_survives_a_failed_batch_and_retries_its_jobs_one_by_one(batching_client, small_request, fail_once):
    client = batching_client
    fail_once(RuntimeError("something broke inside the UNet"))

    ids = [client.post("/jobs", json=small_request(seed=seed)).json()["job_id"] for seed in (1, 2)]
    jobs = [wait_for(client, job_id) for job_id in ids]

    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    assert [job["batch_size"] for job in jobs] == [1, 1]


def test_job_whose_model_cannot_load_fails_with_the_reason(settings, small_request):
    settings.user_models["dave"] = "nobody/no-such-dreambooth"
    with TestClient(create_app(settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request(user_id="dave")).json()["job_id"])

    assert job["status"] == "failed" and "could not download model" in job["error"]


def test_webhook_is_delivered_and_retried_after_a_failure(settings, small_request):
    settings.webhook_backoff_s = 0.05
    receiver = WebhookReceiver(failures=1)
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"]
        wait_for(client, job_id)
        poll(lambda: list(receiver.statuses), lambda statuses: len(statuses) >= 2, "a retried webhook delivery")
    receiver.close()

    assert receiver.statuses == [500, 200]
    assert receiver.bodies[-1]["job_id"] == job_id and receiver.bodies[-1]["status"] == "succeeded"
    assert receiver.bodies[-1]["result"]["images"][0]["url"]


def test_a_webhook_receiver_that_never_answers_does_not_hold_up_the_worker(settings, small_request):
    settings.webhook_timeout_s = 600
    receiver = SilentReceiver()
    with TestClient(create_app(settings)) as client:
        wait_for(client, client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"])
        poll(lambda: len(receiver.connections), lambda count: count >= 1, "the webhook delivery connecting")

        assert client.post("/generate", json=small_request()).status_code == 200
        assert len(receiver.connections) == 1  # the delivery is still waiting for its answer
    receiver.close()
