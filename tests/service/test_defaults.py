"""Defaults that neither lock people out nor tell too much: the first key is an admin's, open mode says so loudly,
the public /health tells only ok and the version, and reads have a rate limit of their own (shareable in Redis)."""

import logging

import pytest
import redis
from fastapi.testclient import TestClient

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_in_open_mode_the_first_key_must_be_an_admins_and_then_keys_are_required(client):
    refused = client.post("/keys", json={"user_id": "alice", "role": "user"})
    admin = client.post("/keys", json={"user_id": "root", "role": "admin"})
    without_key = client.get("/jobs")
    user = client.post("/keys", json={"user_id": "alice"}, headers=bearer(admin.json()["key"]))

    assert refused.status_code == 409 and "first key must be an admin key" in refused.json()["detail"]
    assert admin.status_code == 201 and without_key.status_code == 401 and user.status_code == 201


@pytest.mark.parametrize(("host", "level"), [("0.0.0.0", logging.CRITICAL), ("127.0.0.1", logging.WARNING)])
def test_open_mode_says_so_and_loudly_when_other_machines_can_reach_it(settings, app_factory, caplog, host, level):
    settings.host = host
    with TestClient(app_factory(settings)):
        pass

    record = next(record for record in caplog.records if "no API key is required" in record.getMessage())
    assert record.levelno == level


def test_the_public_health_tells_only_the_status_and_the_version(settings, app_factory):
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        user_key = client.post("/keys", json={"user_id": "alice"}, headers=bearer(ADMIN_KEY)).json()["key"]
        public = client.get("/health").json()
        as_user = client.get("/health", headers=bearer(user_key)).json()
        as_admin = client.get("/health", headers=bearer(ADMIN_KEY)).json()

    assert set(public) == set(as_user) == {"status", "version"}
    assert {"device", "loaded_models", "queue", "cache", "parts", "provenance"} <= set(as_admin)
    assert set(as_admin["parts"]) >= {"device", "loader", "encoder", "webhooks", "database"}


def test_changes_and_reads_have_rate_limits_of_their_own(settings, app_factory, small_request):
    settings.rate_limit, settings.read_rate_limit = "2/minute", "4/minute"
    with TestClient(app_factory(settings)) as client:
        changes = [client.post("/jobs", json=small_request()).status_code for _ in range(3)]
        reads = [client.get("/jobs").status_code for _ in range(5)]
        limited_read = client.get("/jobs")

    assert changes == [202, 202, 429] and reads == [200, 200, 200, 200, 429]
    assert "SD_READ_RATE_LIMIT" in limited_read.json()["detail"] and int(limited_read.headers["Retry-After"]) >= 1


@pytest.fixture
def redis_url() -> str:
    """The local Redis; the test is skipped without one."""
    url = "redis://127.0.0.1:6379"
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis at {url}: {error}")
    return url


def test_rate_limits_kept_in_redis_are_shared_by_replicas(settings, app_factory, small_request, redis_url):
    settings.admin_key, settings.rate_limit, settings.rate_limit_storage = ADMIN_KEY, "2/minute", redis_url
    with TestClient(app_factory(settings)) as first, TestClient(app_factory(settings)) as second:
        on_first = [first.post("/jobs", json=small_request(), headers=bearer(ADMIN_KEY)).status_code for _ in range(2)]
        on_second = second.post("/jobs", json=small_request(), headers=bearer(ADMIN_KEY))

    assert on_first == [202, 202] and on_second.status_code == 429


def test_a_rate_limit_storage_that_does_not_answer_lets_requests_through(settings, app_factory, small_request, caplog):
    settings.rate_limit, settings.rate_limit_storage = "1/minute", "redis://127.0.0.1:1"
    with TestClient(app_factory(settings)) as client:
        statuses = [client.post("/jobs", json=small_request()).status_code for _ in range(2)]

    assert statuses == [202, 202] and "rate limit storage failed" in caplog.text
