"""The job queue: the queued jobs in order and the jobs running now, guarded by one condition that is never held
during I/O. It changes state only through the lifecycle (``transition``) and asks the scheduler which jobs run; the
submission service (``submission``) and the dispatcher (``dispatch``) store and announce what changed, outside."""

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from typing import TypeVar

from sd_server.domain.jobs import Job, JobStatus, utc_now
from sd_server.domain.lifecycle import transition
from sd_server.errors import ServiceError
from sd_server.jobs.admission import Backlog
from sd_server.jobs.batching import images_in
from sd_server.jobs.scheduler import Ledger, ModelCheck, ModelToLoad, Scheduler

T = TypeVar("T")


class JobQueue:
    """Queued jobs in order, running jobs, and jobs being admitted; every change under one condition."""

    def __init__(self, scheduler: Scheduler, max_batch_images: int, batch_wait_s: float, batch_fill_wait_s: float = 0.0) -> None:
        self.scheduler, self.max_batch_images, self.batch_wait_s = scheduler, max_batch_images, batch_wait_s
        self.batch_fill_wait_s = batch_fill_wait_s
        self._demand: dict[Hashable, int] = {}  # per batch shape: most images queued or running since its last batch
        self._queued: list[Job] = []
        self._running: list[Job] = []
        self._admitting: list[Job] = []  # admitted, being inserted into the database
        self.ledger = Ledger()
        self._condition = threading.Condition()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """True once the queue is closed."""
        return self._stopping

    def close(self) -> None:
        """Stop handing out work: the workers finish what they hold and return."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def notify(self) -> None:
        """Wake whoever waits on the queue (new work, a model loaded, an end)."""
        with self._condition:
            self._condition.notify_all()

    def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a change."""
        with self._condition:
            if not self._stopping:
                self._condition.wait(timeout=timeout_s)

    # --- admission -----------------------------------------------------------------------------------

    def admit(self, job: Job, check: Callable[[Backlog], None]) -> None:
        """Hold a place for ``job`` once ``check`` passes (it raises) on the backlog ``job`` joins."""
        with self._condition:
            waiting = self._queued + self._admitting
            mine = [other for other in waiting if other.user_id == job.user_id]
            check(
                Backlog(
                    user_active=len(mine) + sum(other.user_id == job.user_id for other in self._running),
                    user_queued=len(mine),
                    user_cost=sum(other.cost for other in mine),
                    tenant_cost=sum(other.cost for other in waiting if other.tenant == job.tenant),
                    queued=len(waiting),
                    active_users=len({other.user_id for other in waiting + self._running} | {job.user_id}),
                )
            )
            self._admitting.append(job)

    def settle(self, job: Job, enqueue: bool) -> None:
        """Release ``job``'s admission place: into the queue, or (not stored) out."""
        with self._condition:
            self._admitting.remove(job)
            if enqueue:
                self._activate([job])
                self._queued.append(job)
                self._note_demand(self.scheduler.shape(job))
                self._condition.notify_all()

    def put_back(self, jobs: list[Job], front: bool = False) -> list[Job]:
        """Queue jobs again (recovered after a restart, or given back by a lost device), as queued, one attempt
        used by each that was running; returns them (one that ended meanwhile stays ended, and is not returned)."""
        with self._condition:
            jobs = [job for job in jobs if not job.status.is_terminal]
            self._activate(jobs)
            for job in jobs:
                if job in self._running:
                    self._running.remove(job)
                if job.status is not JobStatus.queued:
                    transition(job, JobStatus.queued)
                    job.attempts, job.started_at, job.step = job.attempts + 1, None, 0
            self._queued = [*jobs, *self._queued] if front else [*self._queued, *jobs]
            self._condition.notify_all()
            return jobs

    def _activate(self, jobs: list[Job]) -> None:
        """Bring the users of ``jobs`` who have nothing queued or running up to the system's virtual time."""
        active = {job.user_id for job in self._queued + self._running}
        for user_id in {job.user_id for job in jobs} - active:
            self.ledger.activate(user_id)

    # --- reading -------------------------------------------------------------------------------------

    def _ordered(self) -> list[Job]:
        """The queued jobs in the order the scheduler runs them."""
        return self.scheduler.order(self._queued, self.ledger)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 after it, ... (in the scheduler's order); None once the job is no longer
        queued."""
        with self._condition:
            return self._ordered().index(job) + 1 if job in self._queued else None

    def active_jobs(self, user_id: str) -> list[Job]:
        """The user's running jobs, then their queued ones in queue order."""
        with self._condition:
            return [job for job in self._running + self._queued if job.user_id == user_id]

    def counts(self) -> tuple[int, int]:
        """Jobs queued and running."""
        with self._condition:
            return len(self._queued), len(self._running)

    def depths(self) -> dict[str, int]:
        """Jobs queued per user (users with none left out)."""
        with self._condition:
            return dict(Counter(job.user_id for job in self._queued))

    def shares(self) -> dict[str, float]:
        """Each tenant's share of the pixel-steps served since the start."""
        with self._condition:
            total = sum(self.ledger.served.values())
            return {tenant: served / total for tenant, served in self.ledger.served.items()} if total else {}

    def model_to_load(self, needs_loading: ModelCheck) -> ModelToLoad | None:
        """Wait for a queued job whose model needs loading (the scheduler's choice); None when stopping."""
        with self._condition:
            while not self._stopping:
                target = self.scheduler.model_to_load(self._ordered(), self._running, needs_loading)
                if target is not None:
                    return target
                self._condition.wait(timeout=1.0)
        return None

    # --- changes -------------------------------------------------------------------------------------

    def take_batch(self, is_ready: ModelCheck, wait_s: float) -> list[Job]:
        """The scheduler's next batch, taken off the queue as running, after up to the batch wait for companions;
        empty after ``wait_s`` seconds without one."""
        with self._condition:
            lead = self.scheduler.lead(self._ordered(), is_ready)
            if lead is None:
                if wait_s and not self._stopping:
                    self._condition.wait(timeout=wait_s)
                return []
            self._wait_for_companions(lead)
            if lead not in self._queued or self._stopping:
                return []  # the lead was cancelled while waiting: start over
            batch, started = self.scheduler.batch(lead, self._ordered()), utc_now()
            for job in batch:
                self._queued.remove(job)
                transition(job, JobStatus.running)
                job.started_at, job.batch_size, job.step = started, images_in(batch), 0
            self._running.extend(batch)
            self.ledger.charge(lead, batch, {job.user_id for job in self._queued + self._running})
            self._demand = self._images_by_shape()
            return batch

    def _wait_for_companions(self, lead: Job) -> None:
        """Wait for as many images as ``lead``'s batch shape had queued or running in its last round, up to the fill
        wait: clients that just got their images send the next request within milliseconds, and a batch that waits
        for them runs once instead of in two halves. Beyond that, it waits up to the batch wait for companions
        nobody predicted (a burst of new clients)."""
        shape, started = self.scheduler.shape(lead), time.monotonic()
        expected = min(self._demand.get(shape, 0), self.max_batch_images)
        while not self._stopping and lead in self._queued:
            # Jobs of the shape that the rules keep out of this batch (too many LoRAs, say) have arrived all the same.
            arrived = images_in([job for job in self._queued if self.scheduler.shape(job) == shape])
            waited = time.monotonic() - started
            deadline = self.batch_fill_wait_s if arrived < expected else self.batch_wait_s
            if images_in(self.scheduler.batch(lead, self._ordered())) >= self.max_batch_images or waited >= deadline:
                return
            self._condition.wait(timeout=deadline - waited)

    def _note_demand(self, shape: Hashable) -> None:
        """Raise the demand of batch shape ``shape`` to the images of that shape queued or running now."""
        self._demand[shape] = max(self._demand.get(shape, 0), self._images_by_shape()[shape])

    def _images_by_shape(self) -> Counter[Hashable]:
        """Images queued or running, per batch shape, in one pass."""
        images: Counter[Hashable] = Counter()
        for job in self._queued + self._running:
            images[self.scheduler.shape(job)] += job.images_requested
        return images

    def end_where(self, picks: Callable[[Job], bool], status: JobStatus, error: ServiceError | None = None) -> list[Job]:
        """End the queued and running jobs ``picks`` chooses with ``status``; returns them (to announce)."""
        with self._condition:
            ended = [job for job in self._queued + self._running if picks(job)]
            for job in ended:
                self.end(job, status, error)
            return ended

    def under_lock(self, change: Callable[[], T]) -> T:
        """Run ``change`` (reads and writes of jobs' fields) under the queue's condition."""
        with self._condition:
            return change()

    def end(self, job: Job, status: JobStatus, error: ServiceError | None = None) -> None:
        """End ``job`` with ``status`` (with the condition held: inside ``under_lock``, or from this class)."""
        transition(job, status, (error.message, error.status_code) if error else None)
        job.inputs, job.preview = {}, None  # stored; the device is done with them
        for jobs in (self._queued, self._running):
            if job in jobs:
                jobs.remove(job)
        self._condition.notify_all()  # the loader may now have room for the next model
