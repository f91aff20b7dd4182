"""Webhooks: kept in an outbox until delivered, never reading the receiver's body, within a deadline per attempt,
to a checked address pinned for the connection."""

import asyncio
import ipaddress
import socket

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import FloodingReceiver, SilentReceiver, WebhookReceiver, free_port, poll, wait_for
from sd_server.errors import UnsafeWebhookError
from sd_server.jobs.webhooks import WebhookSender
from sd_server.observability.liveness import Liveness
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.persistence.outbox import WebhookOutbox
from sd_server.persistence.tables import WebhookDeliveryRow
from sd_server.security.webhook_urls import check_webhook_url, is_public, webhook_target


def deliveries(settings) -> list[WebhookDeliveryRow]:
    """The outbox as the database has it."""
    engine = create_database_engine(settings.effective_database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(WebhookDeliveryRow).order_by(WebhookDeliveryRow.id)))
    finally:
        engine.dispose()


def test_closing_the_sender_stops_it_even_when_a_wake_up_completes_as_the_close_begins(settings):
    migrate(settings.effective_database_url)
    database = create_database_engine(settings.effective_database_url)

    async def close_as_a_wake_up_completes() -> None:
        sender = WebhookSender(settings, WebhookOutbox(database), job_payload=lambda job: {}, training_payload=lambda training: {}, liveness=Liveness())
        sender.start()
        await poll_async(lambda: len(sender._wake._waiters) > 0)  # the sender waits for work
        sender._wake.set()
        await asyncio.sleep(0)  # the sender's wait has completed; it has not resumed yet
        closing = asyncio.create_task(sender.close())
        await asyncio.wait({closing}, timeout=30)  # unlike wait_for, a deadline that cancels nothing
        assert closing.done(), "close() is still waiting for the delivery loop to end"

    try:
        asyncio.run(close_as_a_wake_up_completes())
    finally:
        database.dispose()


async def poll_async(condition, rounds: int = 100) -> None:
    """Let the event loop run until ``condition`` holds (at most ``rounds`` short sleeps)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def test_a_receiver_that_streams_a_huge_body_is_not_read_and_the_delivery_counts(settings, app_factory, small_request):
    receiver = FloodingReceiver()
    with TestClient(app_factory(settings)) as client:
        wait_for(client, client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"])
        poll(lambda: deliveries(settings), lambda rows: rows and rows[0].delivered_at is not None, "the delivery recorded")
        assert client.get("/health").status_code == 200
    assert receiver.closed_by_client.wait(60), "the connection stayed open"
    receiver.close()

    assert receiver.sent < 16 * 1024**2  # of 400 MB: the body was never read


def test_a_receiver_that_never_answers_fails_each_attempt_at_its_deadline_then_the_delivery_gives_up(
    settings, app_factory, small_request
):
    settings.webhook_timeout_s, settings.webhook_retries, settings.webhook_backoff_s = 0.5, 1, 0.05
    receiver = SilentReceiver()
    with TestClient(app_factory(settings)) as client:
        wait_for(client, client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"])
        rows = poll(lambda: deliveries(settings), lambda rows: rows and rows[0].failed_at is not None, "the delivery giving up")
        other = client.post("/generate", json=small_request())
    receiver.close()

    assert rows[0].attempts == 2 and "SD_WEBHOOK_TIMEOUT_S" in rows[0].last_error
    assert other.status_code == 200


def test_a_pending_delivery_survives_a_restart(settings, app_factory, small_request):
    settings.webhook_backoff_s, settings.webhook_retries = 0.2, 50
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    with TestClient(app_factory(settings)) as client:  # nobody listens: the first attempts are refused
        job_id = client.post("/jobs", json=small_request(webhook_url=url)).json()["job_id"]
        wait_for(client, job_id)
        poll(lambda: deliveries(settings), lambda rows: rows and rows[0].attempts >= 1, "a refused attempt")

    receiver = WebhookReceiver(port=port)
    with TestClient(app_factory(settings)):
        poll(lambda: list(receiver.bodies), bool, "the delivery after the restart")
    receiver.close()

    assert receiver.bodies[0]["job_id"] == job_id and receiver.bodies[0]["status"] == "succeeded"
    assert deliveries(settings)[0].delivered_at is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://[::127.0.0.1]/hook",  # IPv4-compatible IPv6: loopback inside
        "http://[::ffff:10.0.0.1]/hook",  # IPv4-mapped private
        "http://224.0.0.1/hook",  # multicast
        "http://0.0.0.0/hook",
        "http://" + "a" * 300 + ".example.com/hook",  # a DNS label too long to resolve
        "http://127.0.0.1:99999/hook",  # a port out of range
    ],
)
def test_webhook_urls_that_could_reach_inside_are_refused_with_422(settings, app_factory, small_request, url):
    settings.webhook_allow_private = False
    with TestClient(app_factory(settings)) as client:
        response = client.post("/jobs", json=small_request(webhook_url=url))

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] in (["body", "webhook_url"], ["body", "webhook_url", "url"])


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1", "::ffff:192.168.1.1", "2002:c0a8:0101::1", "224.0.0.1", "fe80::1", "::", "fec0::1", "192.0.0.8",
        "198.18.0.1", "240.0.0.1", "2001:db8::1", "fc00::1", "64:ff9b::a00:1", "64:ff9b:1::808:808", "::ffff:169.254.169.254",
    ],
)  # fmt: skip
def test_addresses_that_are_not_globally_routable_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "192.0.0.9", "2606:4700::1111", "::ffff:93.184.216.34", "64:ff9b::5db8:d822"])
def test_globally_routable_addresses_and_the_forms_that_carry_them_are_public(address):
    assert is_public(ipaddress.ip_address(address))


def test_a_delivery_connects_to_the_address_that_was_checked(monkeypatch):
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]])
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: next(answers))

    target = webhook_target("https://hooks.example.com:8443/sd?x=1", allow_private=False)

    assert target.url == "https://93.184.216.34:8443/sd?x=1"
    assert target.host_header == "hooks.example.com:8443" and target.tls_name == "hooks.example.com"


def test_a_host_that_resolves_to_a_private_address_among_public_ones_is_refused(monkeypatch):
    addresses = [("93.184.216.34", 80), ("10.1.2.3", 80)]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in addresses])

    with pytest.raises(UnsafeWebhookError, match="10.1.2.3"):
        check_webhook_url("http://rebinding.example/hook", allow_private=False)
