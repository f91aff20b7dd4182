"""Session tokens: signed with the server's secret, expiring, with a CSRF token of their own, and live only while
their session is in the database (signing out ends them everywhere)."""

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from sd_server.persistence.database import create_database_engine, migrate
from sd_server.security.sessions import Sessions


@pytest.fixture
def database(both_databases: str) -> Iterator[Engine]:
    """A migrated, empty database (SQLite, and PostgreSQL when a server answers)."""
    migrate(both_databases)
    engine = create_database_engine(both_databases)
    yield engine
    engine.dispose()


def test_a_token_verifies_to_its_key_and_csrf_token_until_it_expires(database, monkeypatch):
    sessions = Sessions("secret", 60, database)
    token, session = sessions.issue("key-1")

    assert sessions.verify(token) == session and session.key_id == "key-1"
    monkeypatch.setattr(time, "time", lambda: session.expires_at + 1)
    assert sessions.verify(token) is None


def test_a_token_of_another_secret_or_altered_does_not_verify(database):
    token, _ = Sessions("secret", 60, database).issue("key-1")
    session_id, expiry, signature = token.split(".")
    sessions = Sessions("secret", 60, database)

    assert Sessions("other", 60, database).verify(token) is None
    assert sessions.verify(f"{'0' * 32}.{expiry}.{signature}") is None
    assert sessions.verify(f"{session_id}.{int(expiry) + 3600}.{signature}") is None
    assert sessions.verify("garbage") is None


def test_an_ended_session_no_longer_verifies_on_any_replica_sharing_the_secret(database):
    replica_a, replica_b = Sessions("shared", 60, database), Sessions("shared", 60, database)
    token, session = replica_a.issue("key-1")
    assert replica_b.verify(token) == session

    replica_a.end(session)

    assert replica_a.verify(token) is None and replica_b.verify(token) is None


@pytest.mark.parametrize("token", ["é.1.x", "abc.١٢٣.sig", "a.1.\udcff", "a.b", "..", "a.99999999999999999999.sig\x00"])
def test_a_token_with_foreign_characters_is_refused_not_an_error(database, token):
    assert Sessions("secret", 60, database).verify(token) is None


def test_each_session_has_its_own_csrf_token(database):
    sessions = Sessions("secret", 60, database)

    assert sessions.issue("key-1")[1].csrf_token != sessions.issue("key-1")[1].csrf_token
