"""Browser sessions for API keys: a key is exchanged once for a signed, expiring cookie that EventSource and <img>
send by themselves; requests that change something must also carry the session's CSRF token in a header, which
another site's page cannot read or forge. Each session is a row in the database: signing out deletes it, and the
cookie stops working at once, on every replica of the API."""

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session as DatabaseSession

from sd_server.domain.jobs import utc_now
from sd_server.persistence.retry import in_session
from sd_server.persistence.tables import BrowserSessionRow

SESSION_COOKIE = "sd_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class Session:
    """A live session: its id, the key it stands for, when it ends, and its CSRF token."""

    session_id: str
    key_id: str
    expires_at: int
    csrf_token: str


def same_secret(presented: str, expected: str) -> bool:
    """Constant-time comparison of a token a client presented (any characters) with one this server made."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode())


class Sessions:
    """Issues, checks and ends sessions. A token is ``session id . expiry . HMAC`` signed with the server's secret
    (SD_SESSION_SECRET; the same on every replica): a forged or expired one is refused without a database read; a
    well-signed one is live while its row is in the database. A revoked key ends its sessions (the key is looked up
    on every request)."""

    def __init__(self, secret: str | None, ttl_s: int, engine: Engine, retry_s: float = 60.0) -> None:
        self._secret = (secret or secrets.token_urlsafe(32)).encode()
        self.ttl_s, self.engine, self.retry_s = ttl_s, engine, retry_s

    def issue(self, key_id: str) -> tuple[str, Session]:
        """A new session for ``key_id``, stored, and its token (sessions that have expired are removed meanwhile)."""
        session_id, expires_at = secrets.token_hex(16), int(time.time()) + self.ttl_s
        row = BrowserSessionRow(
            id=session_id, key_id=key_id, created_at=utc_now(), expires_at=datetime.fromtimestamp(expires_at, UTC)
        )

        def store(database: DatabaseSession) -> None:
            database.execute(delete(BrowserSessionRow).where(BrowserSessionRow.expires_at < utc_now()))
            database.add(row)

        in_session(self.engine, store, "storing a session", self.retry_s, write=True)
        payload = f"{session_id}.{expires_at}"
        token = f"{payload}.{self._sign('session', payload)}"
        return token, Session(session_id, key_id, expires_at, self._sign("csrf", token))

    def verify(self, token: str) -> Session | None:
        """The live session of a token this server signed; None for any other token, an expired one, or one whose
        session has ended."""
        parts = token.split(".")
        if len(parts) != 3 or not token.isascii() or not parts[1].isdigit():
            return None
        session_id, expiry, signature = parts
        if not same_secret(signature, self._sign("session", f"{session_id}.{expiry}")) or int(expiry) < time.time():
            return None
        statement = select(BrowserSessionRow.key_id).where(
            BrowserSessionRow.id == session_id, BrowserSessionRow.expires_at >= utc_now()
        )
        key_id = in_session(self.engine, lambda database: database.scalar(statement), "reading a session", self.retry_s)
        return Session(session_id, key_id, int(expiry), self._sign("csrf", token)) if key_id else None

    def end(self, session: Session) -> None:
        """End ``session`` now: its cookie is refused from the next request on, by every replica."""
        statement = delete(BrowserSessionRow).where(BrowserSessionRow.id == session.session_id)
        in_session(self.engine, lambda database: database.execute(statement), "ending a session", self.retry_s, write=True)

    def _sign(self, purpose: str, text: str) -> str:
        digest = hmac.new(self._secret, f"{purpose}:{text}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
