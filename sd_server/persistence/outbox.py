"""The webhook outbox: each delivery a row, kept until it is delivered or has run out of retries, so a restart
loses none."""

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from sd_server.domain.jobs import utc_now
from sd_server.persistence.retry import in_session
from sd_server.persistence.tables import WebhookDeliveryRow


@dataclass(frozen=True)
class Delivery:
    """A pending delivery: of what ("job <id>" or "training <id>"), where to, what, how many attempts so far, its
    webhook-id, and the key whose secret signs it."""

    id: int
    subject: str
    url: str
    payload: str
    attempts: int
    message_id: str = ""
    key_id: str | None = None


class WebhookOutbox:
    """Deliveries in the database; every operation retried through passing failures for ``retry_s`` seconds."""

    def __init__(self, engine: Engine, retry_s: float = 60.0) -> None:
        self.engine, self.retry_s = engine, retry_s

    def add(
        self, url: str, payload: dict, key_id: str | None = None, job_id: str | None = None, training_id: str | None = None
    ) -> None:
        """Keep a new delivery of a job's or a training's webhook, due now, signed with the secret of ``key_id``."""
        now = utc_now()
        row = WebhookDeliveryRow(
            job_id=job_id, training_id=training_id, url=url, payload=json.dumps(payload), attempts=0, next_attempt_at=now,
            created_at=now, message_id=f"msg_{uuid.uuid4().hex}", key_id=key_id,
        )  # fmt: skip
        in_session(self.engine, lambda session: session.add(row), f"keeping the webhook of {subject(row)}", self.retry_s, write=True)

    def due(self, limit: int, skip: set[int]) -> list[Delivery]:
        """Up to ``limit`` pending deliveries whose time has come, oldest first, but those in ``skip``."""
        statement = (
            select(WebhookDeliveryRow)
            .where(WebhookDeliveryRow.delivered_at.is_(None), WebhookDeliveryRow.failed_at.is_(None))
            .where(WebhookDeliveryRow.next_attempt_at <= utc_now())
            .order_by(WebhookDeliveryRow.next_attempt_at)
            .limit(limit + len(skip))
        )

        def read(session: Session) -> list[Delivery]:
            rows = session.scalars(statement).all()
            return [
                Delivery(row.id, subject(row), row.url, row.payload, row.attempts, row.message_id or f"msg_{row.id}", row.key_id)
                for row in rows
                if row.id not in skip
            ]

        return in_session(self.engine, read, "reading the webhook outbox", self.retry_s)[:limit]

    def delivered(self, delivery: Delivery) -> None:
        """The receiver answered 2xx."""
        self._update(delivery, attempts=delivery.attempts + 1, delivered_at=utc_now(), last_error=None)

    def failed_attempt(self, delivery: Delivery, error: str, retry_at: datetime | None) -> None:
        """An attempt failed: try again at ``retry_at``, or (None) give up."""
        fields = {"next_attempt_at": retry_at} if retry_at else {"failed_at": utc_now()}
        self._update(delivery, attempts=delivery.attempts + 1, last_error=error[:1000], **fields)

    def _update(self, delivery: Delivery, **fields) -> None:
        statement = update(WebhookDeliveryRow).where(WebhookDeliveryRow.id == delivery.id).values(**fields)
        in_session(self.engine, lambda session: session.execute(statement), f"recording webhook delivery {delivery.id}", self.retry_s, write=True)


def subject(row: WebhookDeliveryRow) -> str:
    """What the delivery tells of: "job <id>" or "training <id>"."""
    return f"job {row.job_id}" if row.job_id else f"training {row.training_id}"
