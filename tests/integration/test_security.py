"""API keys, isolation between users, limits, SSRF, CORS, metrics, request ids, readiness and shutdown."""

import base64
import hashlib
import json
import re

import pytest
import sqlalchemy
from fastapi.testclient import TestClient

from helpers import SLOW, png_bytes, poll, wait_for, wait_until_running
from sd_server.app import create_app

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"


@pytest.fixture
def secured(settings):
    """Settings with an admin key: every route but the open ones needs a key."""
    settings.admin_key = ADMIN_KEY
    return settings


@pytest.fixture
def keys(secured):
    """A running secured app, and keys of alice and bob (user role) and the admin."""
    with TestClient(create_app(secured)) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        created = {user: client.post("/keys", json={"user_id": user, "role": "user"}, headers=admin).json() for user in ("alice", "bob")}
        yield client, {"admin": admin, **{user: {"Authorization": f"Bearer {key['key']}"} for user, key in created.items()}}, created


def bobs_job(client, headers, small_request) -> dict:
    """A finished job of bob's."""
    job_id = client.post("/jobs", json=small_request(), headers=headers["bob"]).json()["job_id"]
    return wait_for(client, job_id, headers=headers["bob"])


TRAINING_PHOTOS = [("images", (f"{index}.png", png_bytes(seed=index), "image/png")) for index in range(3)]
TRAINING_FIELDS = {"steps": "2", "resolution": "64", "activate": "false", "class_word": "shape"}


def bobs_training(client, headers) -> dict:
    """A finished (two-step) training of bob's."""
    created = client.post("/users/bob/trainings", files=TRAINING_PHOTOS, data=TRAINING_FIELDS, headers=headers["bob"]).json()
    return poll(
        lambda: client.get(created["links"]["self"], headers=headers["bob"]).json(),
        lambda training: training["status"] == "succeeded",
        "bob's training succeeding",
    )


def protected_routes(client: TestClient, job: dict, key_id: str, small_request, training: dict) -> list[tuple[str, str, dict]]:
    """Every route that needs a key: (method, path, request arguments), with ids of bob's resources."""
    image = job["result"]["image_url"]
    lora = (client.app.state.settings.models_dir / "loras" / "bob.safetensors").read_bytes()
    trained = f"/trainings/{training['training_id']}"
    return [
        ("POST", "/generate", {"json": small_request()}),
        ("POST", "/generate/image", {"json": small_request()}),
        ("POST", "/jobs", {"json": small_request()}),
        ("GET", "/jobs", {"json": None}),
        ("GET", f"/jobs/{job['job_id']}", {"json": None}),
        ("GET", f"/jobs/{job['job_id']}/events", {"json": None}),
        ("GET", image, {"json": None}),
        ("POST", f"/jobs/{job['job_id']}/cancel", {"json": None}),
        ("DELETE", f"/jobs/{job['job_id']}", {"json": None}),
        ("GET", "/models", {"json": None}),
        ("DELETE", "/cache", {"json": None}),
        ("POST", "/keys", {"json": {"user_id": "carol", "role": "user"}}),
        ("GET", "/keys", {"json": None}),
        ("GET", "/users/bob/model", {"json": None}),
        ("PUT", "/users/bob/model", {"json": {"kind": "checkpoint", "source": "demo2"}}),
        ("POST", "/users/bob/lora", {"files": {"file": ("bob.safetensors", lora)}, "data": {"base": "demo"}}),
        ("DELETE", "/users/bob/model", {"json": None}),
        ("POST", f"/keys/{key_id}/webhook-secret", {"json": None}),
        ("DELETE", f"/keys/{key_id}", {"json": None}),
        ("POST", "/users/bob/trainings", {"files": TRAINING_PHOTOS, "data": TRAINING_FIELDS}),
        ("GET", "/trainings", {"json": None}),
        ("GET", trained, {"json": None}),
        ("GET", f"{trained}/events", {"json": None}),
        ("GET", f"{trained}/samples/0", {"json": None}),
        ("POST", f"{trained}/cancel", {"json": None}),
        ("DELETE", trained, {"json": None}),
        ("GET", "/styles", {"json": None}),
        ("PUT", "/styles/Night", {"json": {"prompt": "{prompt} at night"}}),
        ("GET", "/styles/Night", {"json": None}),
        ("DELETE", "/styles/Night", {"json": None}),
        ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "a photo", "steps": 2, "width": 256, "height": 256}}),
        ("POST", "/sdapi/v1/img2img", {"json": {"prompt": "a photo", "steps": 2, "init_images": [base64.b64encode(png_bytes(seed=1)).decode()]}}),
        ("GET", "/sdapi/v1/progress", {"json": None}),
        ("POST", "/sdapi/v1/interrupt", {"json": None}),
        ("GET", "/sdapi/v1/samplers", {"json": None}),
        ("GET", "/sdapi/v1/sd-models", {"json": None}),
        ("GET", "/sdapi/v1/options", {"json": None}),
        ("POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "demo"}}),
        ("GET", "/sdapi/v1/prompt-styles", {"json": None}),
        ("GET", "/sdapi/v1/scripts", {"json": None}),
        ("POST", "/sdapi/v1/skip", {"json": None}),
        ("GET", "/sdapi/v1/schedulers", {"json": None}),
        ("GET", "/sdapi/v1/loras", {"json": None}),
        ("GET", "/sdapi/v1/upscalers", {"json": None}),
        ("GET", "/sdapi/v1/latent-upscale-modes", {"json": None}),
        ("GET", "/sdapi/v1/sd-vae", {"json": None}),
        ("GET", "/sdapi/v1/hypernetworks", {"json": None}),
        ("GET", "/sdapi/v1/embeddings", {"json": None}),
        ("GET", "/sdapi/v1/sd-modules", {"json": None}),
        ("GET", "/sdapi/v1/cmd-flags", {"json": None}),
        ("GET", "/sdapi/v1/memory", {"json": None}),
        ("POST", "/sdapi/v1/refresh-checkpoints", {"json": None}),
        ("POST", "/sdapi/v1/refresh-loras", {"json": None}),
        ("POST", "/sdapi/v1/refresh-vae", {"json": None}),
        ("POST", "/provenance/verify", {"json": {"image": base64.b64encode(png_bytes(seed=1)).decode()}}),
        ("POST", "/sdapi/v1/png-info", {"json": {"image": base64.b64encode(png_bytes(seed=1)).decode()}}),
        ("POST", "/sdapi/v1/extra-single-image", {"json": {"image": base64.b64encode(png_bytes(seed=1)).decode(), "upscaler_1": "Lanczos"}}),
        ("GET", "/session", {"json": None}),
    ]


def test_the_route_matrix_covers_every_route_of_the_schema(keys, small_request):
    client, headers, created = keys
    routes = protected_routes(client, bobs_job(client, headers, small_request), created["bob"]["id"], small_request, bobs_training(client, headers))
    open_routes = {("GET", "/"), ("GET", "/health"), ("GET", "/health/ready"), ("GET", "/metrics"), ("POST", "/session"), ("DELETE", "/session"), ("GET", "/internal/ping")}

    schema = client.get("/openapi.json").json()
    templates = {(method.upper(), path) for path, methods in schema["paths"].items() for method in methods}
    variables = r"/[0-9a-f]{32}|/\d{8}-\d{6}_\d+_[0-9a-f]{32}\.png|(?<=/users)/\w+|(?<=/samples)/\d+|(?<=/styles)/\w+"
    covered = {(method, re.sub(variables, "/{}", path)) for method, path, _ in routes}
    schema_templates = {(method, re.sub(r"\{\w+\}", "{}", path)) for method, path in templates}

    assert schema_templates == covered | open_routes


def test_every_protected_route_answers_401_without_a_key_or_with_a_wrong_one(keys, small_request):
    client, headers, created = keys
    job, training = bobs_job(client, headers, small_request), bobs_training(client, headers)
    for method, path, arguments in protected_routes(client, job, created["bob"]["id"], small_request, training):
        for bad in ({}, {"Authorization": "Bearer not-a-key"}, {"X-API-Key": "not-a-key"}, {"Authorization": "Basic " + base64.b64encode(b"bob:not-a-key").decode()}, {"Authorization": "Basic "}):
            response = client.request(method, path, **arguments, headers=bad)
            assert response.status_code == 401, (method, path, bad, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


def test_another_users_jobs_and_images_answer_404_and_admin_routes_403(keys, small_request):
    client, headers, created = keys
    job, training = bobs_job(client, headers, small_request), bobs_training(client, headers)
    for method, path, arguments in protected_routes(client, job, created["bob"]["id"], small_request, training):
        response = client.request(method, path, **arguments, headers=headers["alice"])
        if path.startswith(("/models", "/cache", "/keys")) or (path.startswith("/styles/") and method != "GET"):
            assert response.status_code == 403, (method, path)
        elif path.startswith("/users/bob"):
            assert response.status_code == 404, (method, path)
        elif job["job_id"] in path or training["training_id"] in path or path.startswith("/images"):
            assert response.status_code == 404, (method, path)
    assert client.get(f"/jobs/{job['job_id']}", headers=headers["bob"]).json()["status"] == "succeeded"
    listed = client.get("/jobs", headers=headers["alice"]).json()["jobs"]
    assert {job["user_id"] for job in listed} == {"alice"} and len(listed) == 5  # her requests above (3, and 2 through A1111's API)


def test_admin_key_reaches_every_route(keys, small_request):
    client, headers, created = keys
    job, training = bobs_job(client, headers, small_request), bobs_training(client, headers)
    for method, path, arguments in protected_routes(client, job, created["bob"]["id"], small_request, training):
        response = client.request(method, path, **arguments, headers=headers["admin"])
        assert response.status_code < 300 or (path.endswith("/cancel") and response.status_code == 409), (method, path)


def test_user_key_acts_as_its_own_user_and_may_not_act_as_another(keys, small_request):
    client, headers, _ = keys
    request = small_request()
    own = client.post("/generate", json=request, headers=headers["bob"])
    explicit = client.post("/generate", json={**request, "user_id": "bob"}, headers=headers["bob"])
    other = client.post("/generate", json={**request, "user_id": "alice"}, headers=headers["bob"])
    other_job = client.post("/jobs", json={**request, "user_id": "alice"}, headers=headers["bob"])

    assert own.json()["user_id"] == "bob" and own.json()["model_id"] == "demo2"
    assert explicit.status_code == 200
    assert other.status_code == 403 and "bob" in other.json()["detail"]
    assert other_job.status_code == 403


def test_x_api_key_header_works_like_bearer_and_revoked_keys_stop_working(keys, small_request):
    client, headers, created = keys
    key = created["alice"]["key"]
    assert client.get("/jobs", headers={"X-API-Key": key}).status_code == 200

    assert client.delete(f"/keys/{created['alice']['id']}", headers=headers["admin"]).status_code == 204
    assert client.get("/jobs", headers={"X-API-Key": key}).status_code == 401


def test_keys_are_stored_hashed_never_in_plain_text(keys, settings):
    client, _, created = keys
    listed = client.get("/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()

    engine = sqlalchemy.create_engine(settings.effective_database_url)
    with engine.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(sqlalchemy.text("SELECT * FROM api_keys"))]
    engine.dispose()
    stored = json.dumps(rows, default=str)
    for plain in [ADMIN_KEY, *(key["key"] for key in created.values())]:
        assert plain not in stored
        assert hashlib.sha256(plain.encode()).hexdigest() in stored
    assert "key" not in listed[0] and len(listed) == 3


def test_auth_off_keeps_the_open_mode_even_with_keys(secured, small_request):
    secured.auth = "off"
    with TestClient(create_app(secured)) as client:
        assert client.post("/generate", json=small_request()).status_code == 200


def test_auth_required_without_any_key_refuses_everyone(settings):
    settings.auth = "required"
    with TestClient(create_app(settings)) as client:
        assert client.get("/jobs").status_code == 401
        assert client.get("/health").status_code == 200


def test_cap_on_active_jobs_per_user_answers_429_with_retry_after(settings, small_request):
    settings.max_active_jobs_per_user = 1
    with TestClient(create_app(settings)) as client:
        running = client.post("/jobs", json=small_request(**SLOW)).json()["job_id"]
        wait_until_running(client, running)
        refused = client.post("/jobs", json=small_request())
        other_user = client.post("/jobs", json=small_request(user_id="bob"))
        client.post(f"/jobs/{running}/cancel")

    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "SD_MAX_ACTIVE_JOBS_PER_USER" in refused.json()["detail"]
    assert other_user.status_code == 202


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/hook", "http://localhost/hook", "http://169.254.169.254/latest/meta-data", "http://10.0.0.7/x", "http://[::1]/x", "http://no-such-host.invalid/x"],
)
def test_webhooks_to_private_or_unresolvable_hosts_are_refused(settings, small_request, url):
    settings.webhook_allow_private = False
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs", json=small_request(webhook_url=url))

    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "webhook_url"]
    assert "SD_WEBHOOK_ALLOW_PRIVATE" in error["msg"] or "does not resolve" in error["msg"]


def test_webhook_url_must_be_http_or_https(client, small_request):
    response = client.post("/jobs", json=small_request(webhook_url="file:///etc/passwd"))

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "webhook_url"]


def test_request_body_over_the_cap_answers_413(settings, small_request):
    settings.max_body_bytes = settings.max_image_body_bytes = 2048
    with TestClient(create_app(settings)) as client:
        response = client.put("/styles/Long", json={"prompt": "x" * 1990, "negative_prompt": "y" * 1990})
        generation = client.post("/generate", json=small_request(prompt="x" * 1990, negative_prompt="y" * 1990))
        fine = client.post("/generate", json=small_request())

    assert response.status_code == 413 and "SD_MAX_BODY_BYTES" in response.json()["detail"]
    assert generation.status_code == 413 and "SD_MAX_IMAGE_BODY_BYTES" in generation.json()["detail"]
    assert fine.status_code == 200


def test_request_body_sent_without_length_is_cut_off_at_the_cap_with_413(settings):
    settings.max_body_bytes = 2048

    def chunks():
        yield b'{"prompt": "' + b"x" * 1500
        yield b"y" * 1500 + b'"}'

    with TestClient(create_app(settings)) as client:
        response = client.put("/users/alice/model", content=chunks(), headers={"content-type": "application/json"})

    assert response.status_code == 413 and "SD_MAX_BODY_BYTES" in response.json()["detail"]


def test_job_over_the_pixel_steps_cap_answers_422_naming_the_setting(settings, small_request):
    settings.max_pixel_steps = 256 * 256 * 2
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs", json=small_request(num_images=2))

    assert response.status_code == 422 and "SD_MAX_PIXEL_STEPS" in response.json()["detail"][0]["msg"]


def test_wildcard_cors_origin_never_allows_credentials(settings):
    settings.cors_origins = ["*"]
    with TestClient(create_app(settings)) as client:
        response = client.options("/generate", headers={"Origin": "https://any.example", "Access-Control-Request-Method": "POST"})

    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


def test_explicit_cors_origin_may_send_credentials(client):
    response = client.options("/generate", headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})

    assert response.headers["access-control-allow-credentials"] == "true"


def metric(text: str, name: str) -> float:
    """The sum of a series' samples in a Prometheus exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))


def test_metrics_expose_the_listed_series_and_they_move_when_a_job_runs(client, small_request):
    series = [
        "sd_http_requests_total", "sd_http_request_duration_seconds_count", "sd_queue_depth", "sd_jobs_active",
        "sd_jobs_finished_total", "sd_batch_size_images_count", "sd_step_seconds_count", "sd_images_generated_total",
        "sd_model_cache_hits", "sd_model_cache_misses", "sd_model_cache_evictions", "sd_model_load_seconds_sum", "sd_model_cache_bytes",
        "sd_device_memory_allocated_bytes",
    ]  # fmt: skip
    before = client.get("/metrics").text
    client.post("/generate", json=small_request(num_images=2))
    client.post("/generate", json=small_request())
    after = client.get("/metrics").text

    for name in series:
        assert f"\n{name}" in "\n" + after, name
    assert metric(after, "sd_images_generated_total") - metric(before, "sd_images_generated_total") == 3
    assert metric(after, 'sd_model_cache_misses{tier="device"}') == 1 and metric(after, 'sd_model_cache_hits{tier="device"}') == 1
    assert metric(after, 'sd_model_cache_misses{tier="cpu"}') == 1  # loaded from disk into host RAM, then moved
    assert metric(after, 'sd_model_cache_bytes{tier="device"}') > 0
    assert metric(after, 'sd_http_requests_total{method="POST",route="/generate",status="200"}') == 2
    assert metric(after, 'sd_jobs_finished_total{status="succeeded"}') == 2


def test_metrics_can_require_an_admin_key(secured):
    secured.metrics_require_admin = True
    with TestClient(create_app(secured)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_request_id_is_returned_logged_and_stored_with_the_job(settings, small_request, capfd):
    with TestClient(create_app(settings)) as client:  # created here, so its log handler writes to this capture
        given = client.post("/jobs", json=small_request(), headers={"X-Request-ID": "trace-abc-123"})
        made = client.get("/health")
        client.post("/generate", json=small_request(user_id="mallory"), headers={"X-Request-ID": "trace-missing-user"})
        stored = client.app.state.services.jobs.get(given.json()["job_id"])

    assert given.headers["X-Request-ID"] == "trace-abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    assert stored.request_id == "trace-abc-123"
    log_line = next(line for line in capfd.readouterr().err.splitlines() if "mallory" in line)
    assert "[trace-missing-user]" in log_line


def test_json_logs_carry_the_request_id(settings, small_request, capfd):
    settings.log_format = "json"
    with TestClient(create_app(settings)) as client:
        client.post("/generate", json=small_request(user_id="mallory"), headers={"X-Request-ID": "json-trace"})

    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert any(line["request_id"] == "json-trace" and "mallory" in line["message"] for line in lines)


def test_image_names_carry_128_random_bits(client, small_request):
    job = wait_for(client, client.post("/jobs", json=small_request(num_images=2)).json()["job_id"])

    names = [image["url"].rsplit("/", 1)[1] for image in job["result"]["images"]]
    assert all(re.fullmatch(r"\d{8}-\d{6}_\d+_[0-9a-f]{32}\.png", name) for name in names)


def test_readiness_is_503_until_the_default_model_has_loaded(settings):
    settings.preload_default_model = True
    with TestClient(create_app(settings)) as client:
        answers = []
        poll(lambda: answers.append(client.get("/health/ready").status_code) or answers[-1], lambda status: status == 200, "readiness")
        assert set(answers) <= {503, 200}
        assert client.get("/health").json()["loaded_models"] == ["demo"]


def test_readiness_stays_503_with_the_reason_when_the_default_model_cannot_load(settings):
    settings.preload_default_model, settings.default_model = True, "nobody/no-such-model"
    with TestClient(create_app(settings)) as client:
        response = poll(lambda: client.get("/health/ready"), lambda answer: "no-such-model" in answer.text, "the reason")
        assert client.get("/health").status_code == 200

    assert response.status_code == 503


def test_shutting_down_refuses_new_work_with_503_but_answers_health(client, small_request):
    client.app.state.shutting_down = True

    assert client.post("/generate", json=small_request()).status_code == 503
    assert client.get("/health").status_code == 200
    assert client.get("/health/ready").status_code == 503
