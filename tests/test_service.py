"""Service routes, CORS, error answers, and the event loop staying free while a generation runs."""

import threading
import time

import httpx
import pytest
import torch
from diffusers import StableDiffusionPipeline

from main import VERSION


def test_root_names_the_service_and_links_docs_and_endpoints(client):
    body = client.get("/").json()

    assert body["version"] == VERSION and body["docs"] == "/docs"
    assert "POST /generate" in body["endpoints"].values()
    assert client.get(body["docs"]).status_code == 200


def test_health_reports_device_dtype_loaded_models_version_queue_and_cache(client, small_request):
    health = client.get("/health").json()
    assert {key: health[key] for key in ("status", "device", "dtype", "loaded_models", "version")} == {
        "status": "ok",
        "device": "cpu",
        "dtype": "float32",
        "loaded_models": [],
        "version": VERSION,
    }
    assert health["queue"] == {"queued": 0, "running": 0, "max_queue": 64, "max_batch_size": 4, "batches_run": 0, "mean_batch_size": 0.0}
    assert health["cache"]["device"]["models"] == [] and health["cache"]["device"]["bytes"] == 0

    client.post("/generate", json=small_request(num_images=2))

    health = client.get("/health").json()
    assert health["loaded_models"] == ["demo"]
    assert health["queue"]["batches_run"] == 1 and health["queue"]["mean_batch_size"] == 2.0
    assert health["cache"]["device"]["models"] == ["demo"] and health["cache"]["device"]["bytes"] > 0


def test_health_answers_within_half_a_second_while_a_generation_runs(live_server, small_request):
    slow = small_request(width=512, height=512, num_inference_steps=40)
    generation = threading.Thread(target=lambda: httpx.post(f"{live_server}/generate", json=slow, timeout=120))
    generation.start()
    time.sleep(0.5)  # let the generation reach the device worker

    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        assert httpx.get(f"{live_server}/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.1)

    assert generation.is_alive(), "the generation finished before /health was measured against it"
    generation.join()
    assert max(latencies) < 0.5, latencies


def test_cors_preflight_from_an_allowed_origin_is_answered(client):
    response = client.options(
        "/generate",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in response.headers["access-control-allow-methods"]


def test_cors_preflight_from_another_origin_is_refused(client):
    response = client.options(
        "/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )

    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_cors_exposes_the_image_headers_to_browsers(client, small_request):
    response = client.post("/generate/image", json=small_request(), headers={"Origin": "http://localhost:3000"})

    exposed = response.headers["access-control-expose-headers"]
    assert {"X-Seed", "X-Model-Id", "X-Generation-Time"} <= {name.strip() for name in exposed.split(",")}


def fail_once(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Make the next pipeline call raise ``error``; later calls run normally."""
    original = StableDiffusionPipeline.__call__
    failures = [error]

    def call(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)


def test_device_out_of_memory_gives_503_saying_what_to_do_and_the_server_goes_on(client, small_request, monkeypatch):
    fail_once(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))

    response = client.post("/generate", json=small_request(num_images=4))

    assert response.status_code == 503
    assert "out of memory" in response.json()["detail"] and "fewer or smaller" in response.json()["detail"]
    assert client.post("/generate", json=small_request()).status_code == 200


def test_unexpected_pipeline_error_gives_json_500_and_the_server_goes_on(client, small_request, monkeypatch):
    fail_once(monkeypatch, RuntimeError("something broke inside the UNet"))

    response = client.post("/generate", json=small_request())

    assert response.status_code == 500
    assert response.json() == {"detail": "generation with model 'demo' failed: RuntimeError: something broke inside the UNet"}
    assert client.post("/generate", json=small_request()).status_code == 200


def test_openapi_schema_documents_the_request_with_an_example(client):
    schema = client.get("/openapi.json").json()

    request_schema = schema["components"]["schemas"]["GenerateRequest"]
    assert request_schema["examples"][0]["prompt"]
    assert set(schema["components"]["schemas"]["SchedulerName"]["enum"]) >= {"pndm", "ddim", "euler", "euler_a", "dpmpp_2m"}
    assert "image/png" in schema["paths"]["/generate/image"]["post"]["responses"]["200"]["content"]
