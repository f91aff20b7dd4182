"""Browser sessions for API keys: a key is exchanged once for a signed, expiring cookie that EventSource and <img>
send by themselves; requests that change something must also carry the session's CSRF token in a header, which
another site's page cannot read or forge."""

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "sd_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class Session:
    """A verified session: the key it stands for, when it ends, and its CSRF token."""

    key_id: str
    expires_at: int
    csrf_token: str


class SessionSigner:
    """Signs and checks session tokens (``key id . expiry . HMAC``) with a server secret: nothing is stored, and a
    revoked key ends its sessions (the key is looked up on every request)."""

    def __init__(self, secret: str | None, ttl_s: int) -> None:
        self._secret = (secret or secrets.token_urlsafe(32)).encode()
        self.ttl_s = ttl_s

    def issue(self, key_id: str) -> tuple[str, Session]:
        """A new token for ``key_id``, and its session."""
        expires_at = int(time.time()) + self.ttl_s
        payload = f"{key_id}.{expires_at}"
        token = f"{payload}.{self._sign('session', payload)}"
        return token, Session(key_id, expires_at, self._sign("csrf", token))

    def verify(self, token: str) -> Session | None:
        """The session of a token this server signed and that has not expired; None otherwise."""
        payload, _, signature = token.rpartition(".")
        key_id, _, expiry = payload.partition(".")
        if not (key_id and expiry.isdigit() and hmac.compare_digest(signature, self._sign("session", payload))):
            return None
        if int(expiry) < time.time():
            return None
        return Session(key_id, int(expiry), self._sign("csrf", token))

    def _sign(self, purpose: str, text: str) -> str:
        digest = hmac.new(self._secret, f"{purpose}:{text}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
