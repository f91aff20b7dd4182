"""API keys and who a request acts as: keys are stored as SHA-256 hashes, compared in constant time."""

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session

from config import Settings
from sd_server.domain.jobs import Priority, utc_now
from sd_server.errors import ForbiddenError
from sd_server.persistence.retry import in_session
from sd_server.persistence.tables import ApiKeyRow, BrowserSessionRow
from sd_server.security.webhook_signing import new_secret

KEY_PREFIX = "sdk_"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a user, an admin, or (with SD_AUTH=off) anyone."""

    user_id: str | None
    role: str
    key_id: str | None = None
    weight: float = 1.0  # its user's share of the device relative to other users'
    priority: Priority = Priority.interactive  # batch: every job of the key runs after interactive ones

    @property
    def is_admin(self) -> bool:
        """Admins act for every user and manage keys, the cache and the registry."""
        return self.role == "admin"

    def can_access(self, owner: str) -> bool:
        """True when this principal may see a resource of ``owner``."""
        return self.is_admin or self.user_id == owner

    def acting_user(self, requested: str | None, default: str) -> str:
        """The user a request acts for: an admin's ``requested`` (else ``default``); a user key's own user, which
        ``requested`` may repeat but not change (ForbiddenError)."""
        if self.is_admin:
            return requested or default
        if requested is not None and requested != self.user_id:
            raise ForbiddenError(f"this key acts as user '{self.user_id}', not '{requested}'")
        return self.user_id


OPEN_ACCESS = Principal(user_id=None, role="admin")


def hash_key(key: str) -> str:
    """SHA-256 of an API key: keys are 256 random bits, so a fast hash is as safe as a slow one."""
    return hashlib.sha256(key.encode()).hexdigest()


def principal_of(row: ApiKeyRow) -> Principal:
    """Whom a stored key acts as, with its weight and priority class (keys from before they existed: 1, interactive)."""
    priority = Priority(row.priority) if row.priority else Priority.interactive
    return Principal(user_id=row.user_id, role=row.role, key_id=row.id, weight=row.weight or 1.0, priority=priority)


class KeyStore:
    """API keys in the database; the plain key exists only in the answer that creates it. Every operation is
    retried through passing database failures for ``retry_s`` seconds."""

    def __init__(self, engine: Engine, retry_s: float = 60.0) -> None:
        self.engine, self.retry_s = engine, retry_s
        self.count = self._count()

    def create(
        self, user_id: str, role: str, key: str | None = None, weight: float = 1.0, priority: Priority = Priority.interactive
    ) -> tuple[ApiKeyRow, str]:
        """Store a new key (random unless given) for ``user_id``, with its user's weight, its priority class and a
        fresh webhook secret; returns its row and the plain key."""
        key = key or KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id=uuid.uuid4().hex, user_id=user_id, role=role, key_hash=hash_key(key), prefix=key[:8], created_at=utc_now(),
            weight=weight, priority=priority.value, webhook_secret=new_secret(),
        )  # fmt: skip
        in_session(self.engine, lambda session: session.add(row), "storing a key", self.retry_s, write=True)
        self.count = self._count()
        return row, key

    def ensure(self, key: str, user_id: str, role: str) -> None:
        """Store ``key`` unless it is stored already (the SD_ADMIN_KEY at start-up)."""
        statement = select(ApiKeyRow.id).where(ApiKeyRow.key_hash == hash_key(key))
        if not in_session(self.engine, lambda session: session.scalar(statement), "reading keys", self.retry_s):
            self.create(user_id, role, key)

    def list(self) -> list[ApiKeyRow]:
        """Every key (without the key itself), oldest first."""
        statement = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
        return in_session(self.engine, lambda session: list(session.scalars(statement)), "reading keys", self.retry_s)

    def delete(self, key_id: str) -> bool:
        """Revoke a key and end its browser sessions; False when there was none with that id."""

        def revoke(session: Session) -> int:
            session.execute(delete(BrowserSessionRow).where(BrowserSessionRow.key_id == key_id))
            return session.execute(delete(ApiKeyRow).where(ApiKeyRow.id == key_id)).rowcount

        deleted = in_session(self.engine, revoke, "revoking a key", self.retry_s, write=True)
        self.count = self._count()
        return bool(deleted)

    def rotate_webhook_secret(self, key_id: str) -> str | None:
        """Give the key a new webhook secret (deliveries from now on carry its signature); None when there is no such
        key."""

        def rotate(session: Session) -> str | None:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                return None
            row.webhook_secret = new_secret()
            return row.webhook_secret

        return in_session(self.engine, rotate, "rotating a webhook secret", self.retry_s, write=True)

    def webhook_secret(self, key_id: str) -> str | None:
        """The key's webhook secret; None for a revoked key or one made before secrets existed."""
        row = in_session(self.engine, lambda session: session.get(ApiKeyRow, key_id), "reading keys", self.retry_s)
        return row.webhook_secret if row else None

    def authenticate(self, key: str) -> Principal | None:
        """The principal of ``key``, or None when no stored key matches."""
        digest = hash_key(key)
        statement = select(ApiKeyRow).where(ApiKeyRow.key_hash == digest)
        row = in_session(self.engine, lambda session: session.scalar(statement), "reading keys", self.retry_s)
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return principal_of(row)

    def principal(self, key_id: str) -> Principal | None:
        """The principal of the key with id ``key_id`` (a session's), or None once it is revoked."""
        row = in_session(self.engine, lambda session: session.get(ApiKeyRow, key_id), "reading keys", self.retry_s)
        return principal_of(row) if row else None

    def _count(self) -> int:
        statement = select(func.count()).select_from(ApiKeyRow)
        return in_session(self.engine, lambda session: session.scalar(statement), "counting keys", self.retry_s)


class Authenticator:
    """Decides whether a key is needed (SD_AUTH) and whose it is."""

    def __init__(self, settings: Settings, keys: KeyStore) -> None:
        self.settings = settings
        self.keys = keys
        if settings.admin_key:
            keys.ensure(settings.admin_key, user_id="admin", role="admin")

    @property
    def required(self) -> bool:
        """SD_AUTH=required, or (the default, auto) as soon as any key exists or SD_ADMIN_KEY is set."""
        if self.settings.auth == "auto":
            return bool(self.settings.admin_key) or self.keys.count > 0
        return self.settings.auth == "required"
