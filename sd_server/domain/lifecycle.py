"""The one lifecycle of every unit of work (a generation job, a training): its phases, the transitions between
them, and the record fields both kinds share. Every status change goes through ``transition``; an illegal one is an
error, never a silent overwrite."""

import asyncio
from datetime import datetime, timezone
from enum import Enum
from typing import Protocol


class Phase(str, Enum):
    """Where a unit of work is: waiting, getting ready (a model, photos), running on the device, or ended."""

    queued = "queued"
    preparing = "preparing"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for the phases work never leaves."""
        return self in TERMINAL


TERMINAL = frozenset({Phase.succeeded, Phase.failed, Phase.cancelled})
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.queued: frozenset({Phase.preparing, Phase.running, Phase.failed, Phase.cancelled}),
    # Back to queued: a restart, a lost device or a clean stop gives the work back to run again.
    Phase.preparing: frozenset({Phase.queued, Phase.running, Phase.failed, Phase.cancelled}),
    Phase.running: frozenset({Phase.queued, *TERMINAL}),  # only running work succeeds
    Phase.succeeded: frozenset(),
    Phase.failed: frozenset(),
    Phase.cancelled: frozenset(),
}


class IllegalTransitionError(RuntimeError):
    """A status change the lifecycle does not allow (a bug in the caller, never a client's fault)."""


class Status(Protocol):
    """A kind's status enum: its API value, and the lifecycle phase it stands for."""

    @property
    def value(self) -> str: ...

    @property
    def phase(self) -> Phase: ...


class Work(Protocol):
    """What every unit of work carries: identity, owner, status, its end and who follows it."""

    id: str
    request_id: str | None
    webhook_url: str | None
    finished_at: datetime | None
    error: str | None
    error_status: int | None
    deleted: bool
    finished: asyncio.Event

    @property
    def status(self) -> Status: ...

    @property
    def user_id(self) -> str: ...


def check_transition(current: Phase, target: Phase, what: str) -> None:
    """IllegalTransitionError unless work may go from ``current`` to ``target``."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"{what} cannot go from {current.value} to {target.value}")


def transition(work: Work, target: Status, failure: tuple[str, int] | None = None) -> None:
    """Move ``work`` to ``target``; an ending stamps the time and ``failure`` (message, HTTP status) or clears it."""
    check_transition(work.status.phase, target.phase, f"{type(work).__name__.lower()} {work.id}")
    work.status = target  # type: ignore[misc]  # a read-only property in the protocol, a field on each kind
    if target.phase.is_terminal:
        work.finished_at = datetime.now(timezone.utc)
        work.error, work.error_status = failure if failure else (None, None)
