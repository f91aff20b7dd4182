"""Signed webhooks, Standard Webhooks style: each delivery carries webhook-id, webhook-timestamp and
webhook-signature made with the submitting key's secret (shown once, rotatable), which the `standardwebhooks`
package verifies; a tampered body fails. Callers choose the events (start, progress, completed); progress is
throttled."""

import json

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from helpers import WebhookReceiver, poll, wait_for

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
EVERY_EVENT = ["start", "progress", "completed"]


@pytest.fixture
def receiver():
    """A local webhook receiver that keeps every delivery as sent."""
    hooks = WebhookReceiver()
    yield hooks
    hooks.close()


def delivered(receiver: WebhookReceiver, job_id: str, count: int = 1) -> list[tuple[dict, bytes]]:
    """The deliveries of ``job_id`` once the one of its end and at least ``count`` in all have come (they may come
    in any order: a progress delivery can arrive after the end's)."""
    def of_job() -> list[tuple[dict, bytes]]:
        return [(headers, raw) for headers, raw in list(receiver.raw) if json.loads(raw)["job_id"] == job_id]

    def complete(hooks: list[tuple[dict, bytes]]) -> bool:
        return len(hooks) >= count and any(json.loads(raw)["status"] == "succeeded" for _, raw in hooks)

    return poll(of_job, complete, f"job {job_id}'s webhooks")


def end_of(hooks: list[tuple[dict, bytes]]) -> tuple[dict, bytes]:
    """The delivery of the job's end."""
    return next((headers, raw) for headers, raw in hooks if json.loads(raw)["status"] == "succeeded")


def test_every_delivery_verifies_with_the_key_secret_and_a_tampered_body_does_not(settings, app_factory, small_request, receiver):
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        key = client.post("/keys", json={"user_id": "alice"}, headers=ADMIN).json()
        alice = {"Authorization": f"Bearer {key['key']}"}
        body = small_request(webhook_url=receiver.url, webhook_events_filter=EVERY_EVENT)
        job_id = client.post("/jobs", json=body, headers=alice).json()["job_id"]
        wait_for(client, job_id, headers=alice)
        hooks = delivered(receiver, job_id, count=2)  # its start and its end at least

    verifier = Webhook(key["webhook_secret"])
    payloads = [verifier.verify(raw, headers) for headers, raw in hooks]
    headers, raw = end_of(hooks)
    tampered = raw.replace(b"succeeded", b"cancelled")
    assert tampered != raw
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(raw, headers)  # another key's secret
    assert key["webhook_secret"].startswith("whsec_")
    assert {payload["status"] for payload in payloads} == {"running", "succeeded"}
    assert len({headers["webhook-id"] for headers, _ in hooks}) == len(hooks)


def test_by_default_only_the_end_is_delivered_and_progress_is_throttled(settings, app_factory, small_request, receiver):
    settings.webhook_progress_interval_s = 3600
    with TestClient(app_factory(settings)) as client:
        body = small_request(webhook_url=receiver.url, webhook_events_filter=["progress", "completed"], num_inference_steps=4)
        chatty = client.post("/jobs", json=body).json()["job_id"]
        delivered(receiver, chatty, count=2)
        quiet = client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"]
        quiet_hooks = delivered(receiver, quiet)  # by now any late delivery of the first job has come too
        chatty_hooks = delivered(receiver, chatty)

    assert [json.loads(raw)["status"] for _, raw in quiet_hooks] == ["succeeded"]
    progress = [json.loads(raw) for _, raw in chatty_hooks if json.loads(raw)["status"] == "running"]
    assert len(progress) == 1 and len(chatty_hooks) == 2  # four steps, one progress delivery within the interval


def test_a_rotated_secret_signs_the_next_deliveries_and_the_old_one_no_longer_verifies(settings, app_factory, small_request, receiver):
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        key = client.post("/keys", json={"user_id": "alice"}, headers=ADMIN).json()
        alice = {"Authorization": f"Bearer {key['key']}"}
        rotated = client.post(f"/keys/{key['id']}/webhook-secret", headers=ADMIN).json()
        missing = client.post("/keys/nope/webhook-secret", headers=ADMIN)
        by_user = client.post(f"/keys/{key['id']}/webhook-secret", headers=alice)
        job_id = client.post("/jobs", json=small_request(webhook_url=receiver.url), headers=alice).json()["job_id"]
        headers, raw = end_of(delivered(receiver, job_id))

    assert rotated["webhook_secret"] != key["webhook_secret"] and missing.status_code == 404 and by_user.status_code == 403
    assert Webhook(rotated["webhook_secret"]).verify(raw, headers)["job_id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(key["webhook_secret"]).verify(raw, headers)


def test_open_mode_signs_with_sd_webhook_secret_when_one_is_set(settings, app_factory, small_request, receiver):
    settings.webhook_secret = "whsec_" + "c2VydmljZS13aWRlLXNlY3JldC0xMjM0"
    with TestClient(app_factory(settings)) as client:
        job_id = client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"]
        headers, raw = end_of(delivered(receiver, job_id))

    assert Webhook(settings.webhook_secret).verify(raw, headers)["job_id"] == job_id


def test_an_unknown_webhook_event_is_refused_naming_the_field(client, small_request, receiver):
    refused = client.post("/jobs", json=small_request(webhook_url=receiver.url, webhook_events_filter=["output"]))

    assert refused.status_code == 422 and "webhook_events_filter" in str(refused.json()["detail"])
