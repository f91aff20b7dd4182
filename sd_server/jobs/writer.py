"""Writing job states to the store outside the queue's lock, and announcing jobs that ended. What the database
does not take (it is locked or gone past SD_DATABASE_RETRY_S) is kept and written once it is back."""

import logging
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from sd_server.domain.jobs import Job, JobStore
from sd_server.errors import DatabaseUnavailableError
from sd_server.jobs.events import JobEvents
from sd_server.observability.liveness import Liveness, PartState

logger = logging.getLogger(__name__)
DATABASE = "database"


class QueueObserver(Protocol):
    """Told about batches and finished jobs (the Prometheus metrics)."""

    def batch_ran(self, images: int, seconds: float, steps: int) -> None: ...

    def job_finished(self, status: str) -> None: ...


class TerminalHook(Protocol):
    """Told, on the thread that ended it, once a job's end is stored (the webhook outbox)."""

    def job_ended(self, job: Job) -> None: ...


class Record(Protocol):
    """What PendingWrites stores: a job or a training."""

    id: str
    request_id: str | None


R = TypeVar("R", bound=Record)


class PendingWrites(Generic[R]):
    """Writes records with ``save``, retried through passing failures. A database that stays away is reported (the
    service is then not ready) and the work goes on in memory: the records it did not take are kept, newest state
    only, and written with the next write or ``flush``; what a crash loses meanwhile, the restart recovers."""

    def __init__(self, save: Callable[[R], None], what: str, liveness: Liveness) -> None:
        self.save, self.what, self.liveness = save, what, liveness
        self._unsaved: dict[str, R] = {}  # records whose last change the database did not take yet
        self._lock = threading.Lock()
        liveness.register(DATABASE, critical=True)

    def persist(self, records: list[R]) -> None:
        """Write each record's state, and those left unsaved before."""
        with self._lock:
            todo = [*records, *(record for record in self._unsaved.values() if record not in records)]
        for index, record in enumerate(todo):
            try:
                self.save(record)
            except DatabaseUnavailableError as error:
                with self._lock:
                    self._unsaved.update({waiting.id: waiting for waiting in todo[index:]})
                self.liveness.set(DATABASE, PartState.failing, error.message)
                logger.error("could not store %s %s: %s (%s)", self.what, record.id, error.message, error.detail, extra={"request_id": record.request_id})
                return  # the database is away: the rest waits with the others
            with self._lock:
                self._unsaved.pop(record.id, None)
        if todo:
            self.liveness.set(DATABASE, PartState.ok)

    def flush(self) -> None:
        """Write the records whose last change the database did not take (a worker does this when idle)."""
        if self._unsaved:
            self.persist([])

    def unsaved(self, record_id: str) -> R | None:
        """The record with that id while the database does not have its last state."""
        with self._lock:
            return self._unsaved.get(record_id)


class JobWriter:
    """Stores jobs' states and announces their ends: to SSE subscribers, the metrics and the webhook outbox."""

    def __init__(self, store: JobStore, events: JobEvents, liveness: Liveness) -> None:
        self.store, self.events, self.liveness = store, events, liveness
        self.observer: QueueObserver | None = None
        self.terminal_hook: TerminalHook | None = None
        self.writes: PendingWrites[Job] = PendingWrites(store.save, "job", liveness)

    def announce(self, ended: list[Job]) -> None:
        """Store the ends of ``ended``, then tell subscribers, the metrics and the outbox."""
        self.persist(ended)
        for job in ended:
            if self.observer:
                self.observer.job_finished(job.status.value)
            self.events.emit(job, job.status.value)
            if self.terminal_hook and job.webhook_url and not job.deleted:
                self.terminal_hook.job_ended(job)

    def flush(self) -> None:
        """Write the jobs whose last change the database did not take (the device worker does this when idle)."""
        self.writes.flush()

    def persist(self, jobs: list[Job]) -> None:
        """Write each job's state, and those left unsaved before (PendingWrites)."""
        self.writes.persist(jobs)
