"""Service routes, CORS and error answers."""

import torch

from sd_server import VERSION


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
    assert health["queue"] == {
        "queued": 0, "running": 0, "max_queue": 64, "max_batch_size": 4, "batches_run": 0, "mixed_batches_run": 0, "mean_batch_size": 0.0,
        "scheduling": "fair", "queued_by_user": {}, "tenant_shares": {},
    }
    assert health["cache"]["device"]["models"] == [] and health["cache"]["device"]["bytes"] == 0
    assert health["compile"] == {
        "enabled": False, "mode": "default", "batch_sizes": [1, 2, 4], "lora_rank": 16, "vae": True,
        "compiles": 0, "compile_seconds": 0.0, "compiles_on_requests": 0, "lora_batches_uncompiled": 0,
    }  # fmt: skip

    client.post("/generate", json=small_request(num_images=2))

    health = client.get("/health").json()
    assert health["loaded_models"] == ["demo"]
    assert health["queue"]["batches_run"] == 1 and health["queue"]["mean_batch_size"] == 2.0
    assert health["cache"]["device"]["models"] == ["demo"] and health["cache"]["device"]["bytes"] > 0


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


def test_device_out_of_memory_gives_503_saying_what_to_do_and_the_server_goes_on(client, small_request, fail_once):
    fail_once(torch.OutOfMemoryError("CUDA out of memory"))

    response = client.post("/generate", json=small_request(num_images=4))

    assert response.status_code == 503
    assert "out of memory" in response.json()["detail"] and "fewer or smaller" in response.json()["detail"]
    assert client.post("/generate", json=small_request()).status_code == 200


def test_unexpected_pipeline_error_gives_500_with_the_request_id_and_logs_the_detail(client, small_request, fail_once, caplog):
    fail_once(RuntimeError("something broke inside the UNet at /secret/path"))

    response = client.post("/generate", json=small_request(), headers={"X-Request-ID": "req-500"})

    assert response.status_code == 500
    assert response.json() == {"detail": "generation with model 'demo' failed; the server log has the details (request id req-500)"}
    assert any("something broke inside the UNet" in record.getMessage() or "something broke" in str(record.exc_info) for record in caplog.records)
    assert client.post("/generate", json=small_request()).status_code == 200


def test_openapi_schema_documents_the_request_with_an_example(client):
    schema = client.get("/openapi.json").json()

    request_schema = schema["components"]["schemas"]["GenerateRequest"]
    assert request_schema["examples"][0]["prompt"]
    assert set(schema["components"]["schemas"]["SchedulerName"]["enum"]) >= {"pndm", "ddim", "euler", "euler_a", "dpmpp_2m"}
    assert "image/png" in schema["paths"]["/generate/image"]["post"]["responses"]["200"]["content"]
