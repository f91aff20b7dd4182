"""Writing job states to the store outside the queue's lock, and announcing jobs that ended. What the database
does not take (it is locked or gone past SD_DATABASE_RETRY_S) is kept and written once it is back."""

import logging
import threading
from typing import Protocol

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


class JobWriter:
    """Stores jobs' states and announces their ends: to SSE subscribers, the metrics and the webhook outbox."""

    def __init__(self, store: JobStore, events: JobEvents, liveness: Liveness) -> None:
        self.store, self.events, self.liveness = store, events, liveness
        self.observer: QueueObserver | None = None
        self.terminal_hook: TerminalHook | None = None
        self._unsaved: dict[str, Job] = {}  # jobs whose last change the database did not take yet
        self._lock = threading.Lock()
        liveness.register(DATABASE, critical=True)

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
        if self._unsaved:
            self.persist([])

    def persist(self, jobs: list[Job]) -> None:
        """Write each job's state, and those left unsaved before, retried through passing failures. A database that
        stays away is reported (the service is then not ready) and the queue goes on in memory; the unsaved states
        are written once it is back, and what a crash loses meanwhile, the restart recovery runs again."""
        with self._lock:
            todo = [*jobs, *(job for job in self._unsaved.values() if job not in jobs)]
        for index, job in enumerate(todo):
            try:
                self.store.save(job)
            except DatabaseUnavailableError as error:
                with self._lock:
                    self._unsaved.update({waiting.id: waiting for waiting in todo[index:]})
                self.liveness.set(DATABASE, PartState.failing, error.message)
                logger.error("could not store job %s: %s (%s)", job.id, error.message, error.detail, extra={"request_id": job.request_id})
                return  # the database is away: the rest waits with the others
            with self._lock:
                self._unsaved.pop(job.id, None)
        if todo:
            self.liveness.set(DATABASE, PartState.ok)
