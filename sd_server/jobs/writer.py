"""One writer for every unit of work: it stores jobs' and trainings' states outside any lock of the queue, keeps
what the database does not take (locked, or gone past SD_DATABASE_RETRY_S) to write once it is back, knows the live
record of all active work, and announces ends on the event bus once they are stored."""

import logging
import threading
from collections.abc import Sequence
from typing import TypeVar

from sd_server.domain.jobs import Job, JobStore
from sd_server.domain.lifecycle import Work
from sd_server.domain.trainings import Training, TrainingStore
from sd_server.errors import DatabaseUnavailableError
from sd_server.jobs.events import EventBus
from sd_server.observability.liveness import Liveness, PartState

logger = logging.getLogger(__name__)
DATABASE = "database"
Record = Job | Training
R = TypeVar("R", Job, Training)


class Writer:
    """Writes records to their store, retried through passing failures. A database that stays away is reported (the
    service is then not ready) and the work goes on in memory: records it did not take are kept, newest state only,
    and written with the next write or ``flush``; what a crash loses meanwhile, the restart recovers."""

    def __init__(self, jobs: JobStore, trainings: TrainingStore, bus: EventBus, liveness: Liveness) -> None:
        self.jobs, self.trainings, self.bus, self.liveness = jobs, trainings, bus, liveness
        self._live: dict[str, Record] = {}  # active work, and ended work whose end is not stored yet
        self._unsaved: dict[str, Record] = {}  # records whose last change the database did not take yet
        self._lock = threading.Lock()
        liveness.register(DATABASE, critical=True)

    def track(self, records: Sequence[Record]) -> None:
        """Keep these active records as the live ones (``current``) until their end is stored."""
        with self._lock:
            self._live.update({record.id: record for record in records})

    def forget(self, record_id: str) -> None:
        """Drop a deleted record: nothing of it is written or found any more."""
        with self._lock:
            self._live.pop(record_id, None)
            self._unsaved.pop(record_id, None)

    def current(self, record_id: str) -> Record | None:
        """The live record with that id: active, or ended with its end not stored yet."""
        with self._lock:
            return self._live.get(record_id)

    def live(self, record: R) -> R:
        """The live record of ``record``'s work while there is one, else ``record`` itself (as the store read it)."""
        current = self.current(record.id)
        return current if isinstance(current, type(record)) else record

    def persist(self, records: Sequence[Record]) -> None:
        """Write each record's state (a deleted one's: nothing), and those left unsaved before."""
        with self._lock:
            todo = [*records, *(record for record in self._unsaved.values() if record not in records)]
        for index, record in enumerate(todo):
            if record.deleted:
                continue
            try:
                self._save(record)
            except DatabaseUnavailableError as error:
                with self._lock:
                    self._unsaved.update({waiting.id: waiting for waiting in todo[index:]})
                self.liveness.set(DATABASE, PartState.failing, error.message)
                what = type(record).__name__.lower()
                logger.error("could not store %s %s: %s (%s)", what, record.id, error.message, error.detail, extra={"request_id": record.request_id})
                return  # the database is away: the rest waits with the others
            with self._lock:
                self._unsaved.pop(record.id, None)
                if record.status.is_terminal:
                    self._live.pop(record.id, None)
        if todo:
            self.liveness.set(DATABASE, PartState.ok)

    def announce(self, ended: Sequence[Record]) -> None:
        """Store the ends of ``ended``, then publish them."""
        self.persist(ended)
        self.publish_ends(ended)

    def publish_ends(self, ended: Sequence[Work]) -> None:
        """Publish the ends of ``ended`` (stored already) on the bus: subscribers, metrics, webhooks."""
        for work in ended:
            self.bus.emit(work, work.status.value)

    def flush(self) -> None:
        """Write the records whose last change the database did not take (a worker does this when idle)."""
        if self._unsaved:
            self.persist([])

    def _save(self, record: Record) -> None:
        if isinstance(record, Job):
            self.jobs.save(record)
        else:
            self.trainings.save(record)
