"""Nothing breaks quietly: the database held locked or gone, a loop that raises, an encoder that fails, a device
that is lost. Each fault is injected for real (a lock taken by another connection) or through the fake engine."""

import threading

import pytest
from fastapi.testclient import TestClient

from helpers import HeldLock, WebhookReceiver, poll, sqlite_file, wait_for
from sd_server.errors import DeviceLostError
from sd_server.persistence.database import create_database_engine
from sd_server.persistence.job_store import SqlJobStore


@pytest.fixture
def quick_database(settings):
    """A database whose locks time out fast, so the retries show within a test."""
    settings.database_lock_timeout_s = 0.2
    return settings


def stored_status(settings, job_id: str) -> str:
    """The job's status as the database has it (not the live object)."""
    engine = create_database_engine(settings.effective_database_url)
    try:
        return SqlJobStore(engine).get(job_id).status.value
    finally:
        engine.dispose()


def test_a_write_lock_held_past_the_timeout_delays_writes_but_jobs_finish_and_health_answers(
    quick_database, app_factory, small_request, caplog
):
    with TestClient(app_factory(quick_database)) as client:
        wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])  # the model is loaded
        lock = HeldLock(sqlite_file(quick_database))
        finished = {}
        submit = threading.Thread(target=lambda: finished.update(response=client.post("/generate", json=small_request())))
        submit.start()
        poll(lambda: caplog.text, lambda text: "retrying" in text, "a write retried while the lock is held")

        health = client.get("/health")
        lock.release()
        submit.join(timeout=60)
        jobs = client.get("/jobs").json()["jobs"]

    assert health.status_code == 200
    assert finished["response"].status_code == 200
    assert [stored_status(quick_database, job["job_id"]) for job in jobs] == ["succeeded", "succeeded"]


def test_a_database_that_stays_locked_makes_the_service_not_ready_and_the_queue_goes_on(quick_database, app_factory, engine, small_request):
    quick_database.database_retry_s = 0.5
    engine.step_gate = threading.Semaphore(0)
    with TestClient(app_factory(quick_database)) as client:
        running = client.post("/jobs", json=small_request()).json()["job_id"]
        wait_for(client, running, "running")
        lock = HeldLock(sqlite_file(quick_database))
        engine.step_gate.release(1000)
        job = wait_for(client, running)  # the live job ends; its end cannot be stored yet
        ready = poll(lambda: client.get("/health/ready"), lambda answer: answer.status_code == 503, "readiness 503")
        refused = client.post("/jobs", json=small_request())
        health = client.get("/health").json()
        lock.release()
        accepted = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])
        ready_again = client.get("/health/ready")

    assert job["status"] == "succeeded"
    assert "database is failing" in ready.json()["detail"]
    assert refused.status_code == 503 and "the database is unavailable" in refused.json()["detail"]
    assert health["status"] == "degraded" and health["parts"]["database"]["state"] == "failing"
    assert accepted["status"] == "succeeded" and ready_again.status_code == 200
    assert stored_status(quick_database, running) == "succeeded"  # written with the next change that got through


def test_an_exception_in_the_device_loop_is_reported_and_the_loop_goes_on(settings, app_factory, engine, small_request):
    engine.readiness_failures.append(RuntimeError("a bug in the engine's bookkeeping"))
    with TestClient(app_factory(settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])
        parts = client.get("/health").json()["parts"]

    assert job["status"] == "succeeded"
    assert parts["device"]["state"] in ("ok", "failing") and parts["device"]["state"] != "dead"


def test_an_encoder_failure_fails_that_job_with_its_request_id_and_the_next_succeeds(settings, app_factory, engine, small_request):
    engine.encode_failures.append(OSError("disk on fire at /srv/secret"))
    with TestClient(app_factory(settings)) as client:
        failed = client.post("/generate", json=small_request(), headers={"X-Request-ID": "enc-1"})
        degraded = client.get("/health").json()
        after = client.post("/generate", json=small_request())
        healthy = client.get("/health").json()

    assert failed.status_code == 500 and "request id enc-1" in failed.json()["detail"] and "/srv" not in failed.text
    assert degraded["status"] == "degraded" and degraded["parts"]["encoder"]["state"] == "failing"
    assert after.status_code == 200 and healthy["parts"]["encoder"]["state"] == "ok"


def test_a_lost_device_stops_the_process_requeues_async_jobs_and_answers_sync_ones(settings, engine, small_request):
    from sd_server.app import create_app

    stops = []
    engine.failures.append(DeviceLostError("the cuda device failed for good in this process; the server restarts"))
    app = create_app(settings, engine_factory=lambda _: engine, on_device_lost=lambda: stops.append(True))
    with TestClient(app) as client:
        engine.load_gate = threading.Event()  # hold the batch until both jobs are queued
        queued_async = client.post("/jobs", json=small_request()).json()["job_id"]
        sync = {}
        waiter = threading.Thread(target=lambda: sync.update(response=client.post("/generate", json=small_request(seed=2))))
        waiter.start()
        poll(lambda: client.get("/health").json()["queue"]["queued"], lambda queued: queued == 2, "both jobs queued")
        engine.load_gate.set()
        waiter.join(timeout=60)
        ready = client.get("/health/ready")
        health = client.get("/health")
        job = client.get(f"/jobs/{queued_async}").json()

    assert stops == [True]
    assert sync["response"].status_code == 503 and "restarts" in sync["response"].json()["detail"]
    assert ready.status_code == 503 and "device is dead" in ready.json()["detail"]
    assert health.status_code == 503 and health.json()["status"] == "not ok"
    assert job["status"] == "queued"
    assert stored_status(settings, queued_async) == "queued"  # it runs after the restart


def test_a_webhook_whose_job_ends_while_the_database_is_locked_is_delivered_once_it_is_back(
    quick_database, app_factory, engine, small_request, caplog
):
    quick_database.database_retry_s = 0.5
    engine.step_gate = threading.Semaphore(0)
    receiver = WebhookReceiver()
    try:
        with TestClient(app_factory(quick_database)) as client:
            job_id = client.post("/jobs", json=small_request(webhook_url=receiver.url)).json()["job_id"]
            wait_for(client, job_id, "running")
            lock = HeldLock(sqlite_file(quick_database))
            engine.step_gate.release(1000)
            poll(lambda: caplog.text, lambda text: "could not keep the webhook" in text, "the webhook refused by the database")
            lock.release()
            poll(lambda: list(receiver.bodies), bool, "the webhook after the database came back")
    finally:
        receiver.close()

    assert receiver.bodies[0]["job_id"] == job_id and receiver.bodies[0]["status"] == "succeeded"
