"""What a browser needs from the API: an API key exchanged for a session cookie that EventSource and <img> carry,
CSRF protection on changes made with it, CORS headers a cross-origin app can read, the web app at /ui, and API
docs that load without network."""

import re

import pytest
from fastapi.testclient import TestClient

from config import Settings
from helpers import wait_for
from sd_server.app import create_app
from sd_server.security.sessions import CSRF_HEADER, SESSION_COOKIE

ADMIN_KEY = "admin-key-for-the-session-tests-0123"


@pytest.fixture
def secured(settings: Settings):
    """A client of the app with keys on, and a key of alice's."""
    settings.admin_key = ADMIN_KEY
    with TestClient(create_app(settings)) as client:
        key = client.post("/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()
        yield client, key


def test_signing_in_sets_an_httponly_strict_cookie_and_answers_the_csrf_token(secured):
    client, key = secured

    response = client.post("/session", json={"api_key": key["key"]})

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["user_id"], body["role"], body["open"]) == ("alice", "user", False) and body["csrf_token"]
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure when served over HTTPS
    assert client.get("/session").json()["csrf_token"] == body["csrf_token"]  # a reloaded page reads it back


def test_sd_session_samesite_none_makes_a_secure_cookie_a_frontend_on_another_site_can_send(settings: Settings):
    settings.admin_key, settings.session_samesite = ADMIN_KEY, "none"
    with TestClient(create_app(settings)) as client:
        key = client.post("/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]
        signed_in = client.post("/session", json={"api_key": key}).headers["set-cookie"]
        signed_out = client.delete("/session").headers["set-cookie"]

    assert "SameSite=none" in signed_in and "Secure" in signed_in and "HttpOnly" in signed_in
    assert "SameSite=none" in signed_out and "Secure" in signed_out


def test_the_session_cookie_carries_reads_events_and_images_and_changes_need_the_csrf_token(secured, small_request):
    client, key = secured
    csrf = client.post("/session", json={"api_key": key["key"]}).json()["csrf_token"]

    refused = client.post("/jobs", json=small_request())
    created = client.post("/jobs", json=small_request(), headers={CSRF_HEADER: csrf})
    job = wait_for(client, created.json()["job_id"])
    events = client.get(f"/jobs/{job['job_id']}/events")
    image = client.get(job["result"]["image_url"])

    assert refused.status_code == 403 and CSRF_HEADER in refused.json()["detail"]
    assert created.status_code == 202 and job["user_id"] == "alice" and job["status"] == "succeeded"
    assert events.status_code == 200 and "event: succeeded" in events.text
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"


def test_a_wrong_key_a_forged_cookie_and_a_revoked_key_get_no_session(secured):
    client, key = secured
    wrong = client.post("/session", json={"api_key": "sdk_not-a-key"})
    client.post("/session", json={"api_key": key["key"]})
    token = client.cookies[SESSION_COOKIE]
    client.cookies.clear()
    with_cookie = lambda value: client.get("/jobs", headers={"Cookie": f"{SESSION_COOKIE}={value}"})  # noqa: E731
    forged = with_cookie(re.sub(r"\.[^.]+$", ".forged", token))
    before = with_cookie(token)
    client.delete(f"/keys/{key['id']}", headers={"X-API-Key": ADMIN_KEY})
    revoked = with_cookie(token)

    assert wrong.status_code == 401 and forged.status_code == 401
    assert before.status_code == 200 and revoked.status_code == 401


def test_signing_out_forgets_the_cookie(secured):
    client, key = secured
    client.post("/session", json={"api_key": key["key"]})

    response = client.delete("/session")

    assert response.status_code == 204 and client.get("/jobs").status_code == 401


def test_in_open_mode_signing_in_sets_nothing_and_says_so(client):
    response = client.post("/session", json={"api_key": "anything"})

    assert response.json() | {"open": True, "csrf_token": None} == response.json() and "set-cookie" not in response.headers


def test_a_cross_origin_app_can_read_location_seed_model_time_and_request_id(client, small_request):
    headers = {"Origin": "http://localhost:3000"}

    created = client.post("/jobs", json=small_request(), headers=headers)
    image = client.post("/generate/image", json=small_request(), headers=headers)

    exposed = {name.strip().lower() for name in created.headers["access-control-expose-headers"].split(",")}
    assert {"location", "x-seed", "x-model-id", "x-generation-time", "x-request-id"} <= exposed
    assert image.headers["access-control-allow-origin"] == "http://localhost:3000" and image.headers["x-seed"]


def test_the_api_docs_load_their_scripts_from_this_server(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        scripts = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert scripts and all(url.startswith("/") for url in scripts), scripts
        assert all(client.get(url).status_code == 200 for url in scripts)


def test_the_web_app_is_served_at_ui(client):
    page = client.get("/ui/")
    assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)

    assert page.status_code == 200 and "<title>Personalized Stable Diffusion</title>" in page.text
    assert sorted(assets) == ["/docs-assets/favicon.png", "app.css", "app.js"]
    assert all(client.get(asset if asset.startswith("/") else f"/ui/{asset}").status_code == 200 for asset in assets)
