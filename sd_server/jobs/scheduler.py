"""The scheduler: which work the device takes next. A pure function of the queued work, the service each user has
had (the ``Ledger``) and the rules, with no threads, locks or clocks, so a policy is tested by calling it.

``FairScheduler`` is start-time fair queuing across per-user queues: each user has a virtual time, the cost
(pixel-steps) served to them divided by their weight, and the user furthest behind leads the next batch; a user who
was idle comes back at the system's virtual time, so idling earns no credit. Interactive jobs lead before batch
ones. ``FifoScheduler`` serves the oldest job first (within a priority class)."""

import heapq
from collections import Counter, deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from sd_server.domain.jobs import Job, Priority
from sd_server.domain.models import UserModel
from sd_server.jobs.batching import BatchRules, batch_key, companions

ModelCheck = Callable[[UserModel], bool]


class Turn(str, Enum):
    """What the device does next."""

    batch = "batch"
    training = "training"
    idle = "idle"


@dataclass(frozen=True)
class ModelToLoad:
    """A model a queued job needs, and the checkpoints that must stay on the device meanwhile."""

    model: UserModel
    keep: frozenset[str]


@dataclass
class Ledger:
    """The service users have had: each user's virtual time (pixel-steps served / weight), the system's (the virtual
    time of the last batch's lead), and the pixel-steps served per tenant. Changed under the queue's condition."""

    tags: dict[str, float] = field(default_factory=dict)
    now: float = 0.0
    served: Counter[str] = field(default_factory=Counter)

    def tag(self, user_id: str) -> float:
        """The user's virtual time (the system's, for a user not seen yet)."""
        return self.tags.get(user_id, self.now)

    def activate(self, user_id: str) -> None:
        """A user with nothing queued or running queues a job: they start at the system's virtual time at the
        earliest, so time spent idle earns no credit."""
        self.tags[user_id] = max(self.tag(user_id), self.now)

    def charge(self, lead: Job, batch: Sequence[Job], active_users: Collection[str]) -> None:
        """Count ``batch`` (led by ``lead``) as served, and forget the idle users who are not ahead of the system."""
        self.now = max(self.now, self.tag(lead.user_id))
        for job in batch:
            self.tags[job.user_id] = self.tag(job.user_id) + job.cost / job.weight
            self.served[job.tenant] += job.cost
        self.tags = {user: tag for user, tag in self.tags.items() if tag > self.now or user in active_users}


@dataclass
class DeviceUsage:
    """Device seconds spent generating and training, each halved every ``half_life_s`` seconds of device time, so
    that the training share is that of the last minutes. Changed under the queue's condition."""

    half_life_s: float = 60.0
    batch_s: float = 0.0
    training_s: float = 0.0

    def record(self, training: bool, seconds: float) -> None:
        """Count ``seconds`` of the device spent on a training slice (``training``) or a batch."""
        decay = 0.5 ** (seconds / self.half_life_s)
        self.batch_s, self.training_s = self.batch_s * decay, self.training_s * decay
        if training:
            self.training_s += seconds
        else:
            self.batch_s += seconds

    @property
    def training_share(self) -> float:
        """The trainings' share of the device lately (0 before anything ran)."""
        total = self.batch_s + self.training_s
        return self.training_s / total if total else 0.0


class Scheduler(Protocol):
    """A policy: the device's next turn, the order queued jobs run in, the job that leads the next batch, its
    companions, which jobs may ever share a batch (their shape, whose recent demand the queue waits for), and the
    next load."""

    def turn(self, batch_ready: bool, training_waiting: bool, training_share: float) -> Turn: ...

    def order(self, queued: Sequence[Job], ledger: Ledger) -> list[Job]: ...

    def lead(self, ordered: Sequence[Job], is_ready: ModelCheck) -> Job | None: ...

    def batch(self, lead: Job, ordered: Sequence[Job]) -> list[Job]: ...

    def shape(self, job: Job) -> Hashable: ...

    def model_to_load(self, ordered: Sequence[Job], running: Sequence[Job], needs_loading: ModelCheck) -> ModelToLoad | None: ...


@dataclass(frozen=True)
class FifoScheduler:
    """First come, first served within a priority class: the first job in order whose model is ready leads, the
    largest compatible batch joins it, models load in that order, and trainings get ``training_share`` of a busy
    device (all of an idle one)."""

    rules: BatchRules
    training_share: float = 0.0

    def turn(self, batch_ready: bool, training_waiting: bool, training_share: float) -> Turn:
        """A training slice while the trainings have had less than their share of the device lately (a generation
        waits at most one slice), else a ready batch, else a training."""
        if training_waiting and (not batch_ready or training_share < self.training_share):
            return Turn.training
        return Turn.batch if batch_ready else Turn.idle

    def order(self, queued: Sequence[Job], ledger: Ledger) -> list[Job]:
        """Interactive jobs in queue order, then batch ones."""
        return sorted(queued, key=lambda job: job.priority is Priority.batch)

    def lead(self, ordered: Sequence[Job], is_ready: ModelCheck) -> Job | None:
        """The first job in order whose model is on the device (jobs whose model loads wait without holding others)."""
        return next((job for job in ordered if is_ready(job.model)), None)

    def batch(self, lead: Job, ordered: Sequence[Job]) -> list[Job]:
        """``lead`` and the queued jobs that can share its pipeline call, in order, within the rules."""
        return companions(lead, ordered, self.rules)

    def shape(self, job: Job) -> Hashable:
        """What jobs that may share a batch have in common: the call's shape, and the model where models never mix."""
        return batch_key(job), None if self.rules.across_adapters else job.model

    def model_to_load(self, ordered: Sequence[Job], running: Sequence[Job], needs_loading: ModelCheck) -> ModelToLoad | None:
        """The model of the first job in order that needs loading; the checkpoints of the running batch and of the
        jobs ahead of it stay."""
        keep = {job.model.base for job in running}
        for job in ordered:
            if needs_loading(job.model):
                return ModelToLoad(job.model, frozenset(keep))
            keep.add(job.model.base)
        return None


@dataclass(frozen=True)
class FairScheduler(FifoScheduler):
    """Weighted fair queuing by cost: jobs run in the order start-time fair queuing serves them, so users share the
    device in proportion to their weights whatever each has queued; batches still take every compatible job."""

    def order(self, queued: Sequence[Job], ledger: Ledger) -> list[Job]:
        """Interactive jobs, then batch ones, each class in fair order: repeatedly the next job of the user with the
        least virtual time, which that job then advances by its cost / weight (ties: the older job first)."""
        ordered: list[Job] = []
        tags = {job.user_id: ledger.tag(job.user_id) for job in queued}
        position = {job.id: index for index, job in enumerate(queued)}
        for priority in Priority:
            per_user: dict[str, deque[Job]] = {}
            for job in queued:
                if job.priority is priority:
                    per_user.setdefault(job.user_id, deque()).append(job)
            heap = [(tags[user], position[jobs[0].id], user) for user, jobs in per_user.items()]
            heapq.heapify(heap)
            while heap:
                _, _, user = heapq.heappop(heap)
                job = per_user[user].popleft()
                ordered.append(job)
                tags[user] += job.cost / job.weight
                if per_user[user]:
                    heapq.heappush(heap, (tags[user], position[per_user[user][0].id], user))
        return ordered
