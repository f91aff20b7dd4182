"""Session tokens: signed with the server's secret, bound to a key, expiring, with a CSRF token of their own."""

import time

from sd_server.security.sessions import SessionSigner


def test_a_token_verifies_to_its_key_and_csrf_token_until_it_expires(monkeypatch):
    signer = SessionSigner("secret", ttl_s=60)
    token, session = signer.issue("key-1")

    assert signer.verify(token) == session and session.key_id == "key-1"
    monkeypatch.setattr(time, "time", lambda: session.expires_at + 1)
    assert signer.verify(token) is None


def test_a_token_of_another_secret_or_altered_does_not_verify():
    token, _ = SessionSigner("secret", ttl_s=60).issue("key-1")
    key_id, expiry, signature = token.split(".")

    assert SessionSigner("other", ttl_s=60).verify(token) is None
    assert SessionSigner("secret", ttl_s=60).verify(f"key-2.{expiry}.{signature}") is None
    assert SessionSigner("secret", ttl_s=60).verify(f"{key_id}.{int(expiry) + 3600}.{signature}") is None
    assert SessionSigner("secret", ttl_s=60).verify("garbage") is None


def test_each_session_has_its_own_csrf_token():
    signer = SessionSigner("secret", ttl_s=60)

    assert signer.issue("key-1")[1].csrf_token != signer.issue("key-2")[1].csrf_token
