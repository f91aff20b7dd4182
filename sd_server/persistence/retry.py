"""Retries of database operations that failed for a passing reason (a lock held too long, a lost connection), with
exponential backoff up to a deadline; past it, DatabaseUnavailableError (503)."""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from sd_server.errors import DatabaseUnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_DELAY_S, LONGEST_DELAY_S = 0.05, 2.0


def is_passing(error: DBAPIError) -> bool:
    """True for failures that a later attempt may not meet: locks, busy files, lost connections."""
    return isinstance(error, OperationalError) or error.connection_invalidated


def with_retries(operation: Callable[[], T], what: str, deadline_s: float) -> T:
    """Run ``operation``; after a passing database failure wait and run it again, until ``deadline_s`` has passed.
    Only for operations that are safe to repeat (an update of a whole row, a read, an insert of a new key)."""
    started, delay = time.monotonic(), FIRST_DELAY_S
    while True:
        try:
            return operation()
        except DBAPIError as error:
            if not is_passing(error):
                raise
            if time.monotonic() - started + delay > deadline_s:
                raise DatabaseUnavailableError(
                    f"the database is unavailable ({what}); retry later", detail=f"{type(error.orig).__name__}: {error.orig}"
                ) from error
            logger.warning("database %s failed (%s); retrying in %.2f s", what, error.orig, delay)
            time.sleep(delay)
            delay = min(delay * 2, LONGEST_DELAY_S)


def in_session(engine: Engine, work: Callable[[Session], T], what: str, retry_s: float, write: bool = False) -> T:
    """Run ``work`` in a session of its own (in one transaction when ``write``), retried through passing failures."""

    def attempt() -> T:
        with Session(engine, expire_on_commit=False) as session:
            if not write:
                return work(session)
            with session.begin():
                return work(session)

    return with_retries(attempt, what, retry_s)
