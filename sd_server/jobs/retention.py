"""Retention: jobs that ended longer ago than SD_RETENTION_DAYS are deleted with their images, periodically."""

import asyncio
import logging
from datetime import timedelta

from config import Settings
from sd_server.domain.jobs import JobStore, utc_now
from sd_server.errors import summary
from sd_server.jobs.submission import Jobs
from sd_server.observability.liveness import Liveness, PartState

logger = logging.getLogger(__name__)


class Retention:
    """Deletes old finished jobs every SD_RETENTION_INTERVAL_S while SD_RETENTION_DAYS is set."""

    def __init__(self, settings: Settings, jobs: Jobs, store: JobStore, liveness: Liveness) -> None:
        self.settings, self.jobs, self.store, self.liveness = settings, jobs, store, liveness
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic task on the running event loop (nothing when SD_RETENTION_DAYS is unset)."""
        if self.settings.retention_days:
            self._task = asyncio.create_task(self._run_periodically())
            self.liveness.register("retention", alive=lambda: self._task is not None and not self._task.done())

    def stop(self) -> None:
        """Stop the periodic task."""
        if self._task:
            self._task.cancel()

    def apply(self) -> int:
        """Delete the jobs that ended over SD_RETENTION_DAYS ago, and their images; returns how many."""
        cutoff = utc_now() - timedelta(days=self.settings.retention_days or 0)
        old_jobs = self.store.finished_before(cutoff)
        for job in old_jobs:
            self.jobs.delete(job)
        if old_jobs:
            logger.info("retention: deleted %d jobs that ended before %s", len(old_jobs), cutoff.isoformat())
        return len(old_jobs)

    async def _run_periodically(self) -> None:
        """Apply the retention every SD_RETENTION_INTERVAL_S; a failed run is logged and reported, and the next
        one comes as planned."""
        while True:
            try:
                await asyncio.to_thread(self.apply)
                self.liveness.set("retention", PartState.ok)
            except Exception as error:
                logger.exception("the retention run failed; the next one comes in SD_RETENTION_INTERVAL_S")
                self.liveness.set("retention", PartState.failing, summary(error))
            await asyncio.sleep(self.settings.retention_interval_s)
