"""Standard Webhooks signatures: each delivery carries ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``), keyed by a ``whsec_`` secret, so
a receiver checks with any Standard Webhooks library that the body is the service's and recent."""

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 24 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` of ``body`` sent as message ``message_id`` at ``timestamp`` (Unix seconds)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def webhook_headers(message_id: str, timestamp: int, body: bytes, secret: str | None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt; without a secret, the id and timestamp alone."""
    headers = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if secret is not None:
        headers["webhook-signature"] = signature(secret, message_id, timestamp, body)
    return headers
