"""The SQL job store and its migrations, on SQLite and (when a server answers) on PostgreSQL."""

from dataclasses import asdict, replace
from datetime import timedelta

import pytest
import sqlalchemy

from sd_server.domain.generation import Generation, Hires
from sd_server.domain.jobs import Job, JobQuery, JobStatus, Priority, StoredImage, utc_now
from sd_server.domain.models import LoraModel
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.persistence.job_store import SqlJobStore


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every store test runs on SQLite and on PostgreSQL."""
    return both_databases


@pytest.fixture
def store(database_url: str) -> SqlJobStore:
    """A migrated, empty job store."""
    migrate(database_url)
    engine = create_database_engine(database_url)
    yield SqlJobStore(engine)
    engine.dispose()


def make_job(user_id: str = "default", model_id: str = "demo", **fields) -> Job:
    """A job record as the queue makes them."""
    request = Generation("a photo of sks person", None, user_id, 2, 7.5, 256, 256, None, 1, None)
    return Job(request, model_id, 7, synchronous=False, **fields)


def test_migrations_create_every_table_from_an_empty_database(database_url):
    migrate(database_url)
    migrate(database_url)  # a second run is a no-op

    engine = create_database_engine(database_url)
    inspector = sqlalchemy.inspect(engine)
    assert {"jobs", "job_images", "api_keys", "user_models", "webhook_deliveries", "trainings", "styles", "browser_sessions", "alembic_version"} <= set(inspector.get_table_names())
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar() == "0010"
        if engine.dialect.name == "sqlite":
            assert connection.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_a_finished_job_is_stored_with_every_parameter_and_its_images(store):
    job = make_job(webhook_url="http://hooks.example/x", idempotency_key="default:k1", fingerprint="f" * 64)
    store.add(job)
    job.status, job.started_at, job.finished_at = JobStatus.succeeded, utc_now(), utc_now()
    job.scheduler_used, job.batch_size, job.step, job.generation_seconds = "pndm", 2, 3, 1.25
    job.images = [StoredImage(7, "a.png", 123, "0" * 64), StoredImage(8, "b.png", 456, "1" * 64)]
    store.save(job)

    loaded = SqlJobStore(store.engine).get(job.id)  # a fresh store: read from the database

    assert loaded is not job
    assert {**asdict(loaded.request), "seed": None} == asdict(job.request)
    assert loaded.seed == 7 and loaded.status is JobStatus.succeeded and loaded.scheduler_used == "pndm"
    assert [(image.seed, image.key, image.size_bytes) for image in loaded.images] == [(7, "a.png", 123), (8, "b.png", 456)]
    assert loaded.created_at == job.created_at and loaded.finished_at == job.finished_at
    assert (loaded.batch_size, loaded.step, loaded.generation_seconds) == (2, 3, 1.25)
    assert loaded.webhook_url == job.webhook_url and loaded.finished.is_set()
    assert store.find_by_idempotency_key("default:k1").id == job.id


def test_history_filters_by_user_status_and_time(store):
    now = utc_now()
    old = make_job(user_id="alice", created_at=now - timedelta(days=2))
    failed = make_job(user_id="alice", status=JobStatus.failed)
    bob = make_job(user_id="bob")
    for job in (old, failed, bob):
        store.add(job)

    def ids(**filters) -> set[str]:
        return {job.id for job in store.page(JobQuery(**filters))[0]}

    assert ids(user_id="alice") == {old.id, failed.id}
    assert ids(status=JobStatus.failed) == {failed.id}
    assert ids(created_after=now - timedelta(days=1)) == {failed.id, bob.id}
    assert ids(created_before=now - timedelta(days=1)) == {old.id}


def test_cursor_pages_stay_stable_while_jobs_are_inserted(store):
    start = utc_now() - timedelta(hours=1)
    jobs = [make_job(created_at=start + timedelta(seconds=index)) for index in range(7)]
    for job in jobs:
        store.add(job)

    first, total, cursor = store.page(JobQuery(limit=3))
    for index in range(5):  # newer jobs arrive between page fetches
        store.add(make_job(created_at=utc_now() + timedelta(seconds=index)))
    second, _, cursor = store.page(JobQuery(limit=3, cursor=cursor))
    third, _, last_cursor = store.page(JobQuery(limit=3, cursor=cursor))

    newest_first = [job.id for job in reversed(jobs)]
    assert total == 7
    assert [job.id for job in first + second + third] == newest_first
    assert last_cursor is None




def test_a_jobs_priority_weight_and_tenant_survive_a_restart(store):
    job = make_job(user_id="carol", priority=Priority.batch, weight=2.5, tenant="photo-app")
    store.add(job)

    stored = SqlJobStore(store.engine).get(job.id)

    assert (stored.priority, stored.weight, stored.tenant) == (Priority.batch, 2.5, "photo-app")


def test_a_jobs_model_is_stored_with_it(store):
    model = LoraModel(base="demo", source="loras/alice.safetensors", scale=0.7)
    job = make_job(user_id="carol", model=model, model_id=model.label)
    store.add(job)

    stored = SqlJobStore(store.engine).get(job.id)

    assert stored.model == model and stored.model_id == "demo+loras/alice.safetensors@0.7"


def test_a_jobs_hires_fix_is_stored_with_it_and_counts_in_its_steps(store):
    job = make_job()
    job = Job(replace(job.request, hires=Hires(512, 512, "Latent (bicubic)", 10, 0.5)), "demo", 7, synchronous=False)
    store.add(job)

    stored = SqlJobStore(store.engine).get(job.id)

    assert stored.request.hires == Hires(512, 512, "Latent (bicubic)", 10, 0.5)
    assert stored.total_steps == 2 + 5 and stored.cost == 256 * 256 * 2 + 512 * 512 * 5
