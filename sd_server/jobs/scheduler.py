"""The scheduler: which work the device takes next. A pure function of the queued work and the rules, with no
threads, locks or clocks, so a policy is tested by calling it, and a fair policy replaces FIFO by implementing
``Scheduler`` (the queue, the workers and the API stay as they are)."""

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from sd_server.domain.jobs import Job
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


class Scheduler(Protocol):
    """A policy: the device's next turn, the job that leads the next batch, its companions, which jobs may ever
    share a batch (their shape, whose recent demand the queue waits for), and the next load."""

    def turn(self, batch_ready: bool, training_waiting: bool) -> Turn: ...

    def lead(self, queued: Sequence[Job], is_ready: ModelCheck) -> Job | None: ...

    def batch(self, lead: Job, queued: Sequence[Job]) -> list[Job]: ...

    def shape(self, job: Job) -> Hashable: ...

    def model_to_load(self, queued: Sequence[Job], running: Sequence[Job], needs_loading: ModelCheck) -> ModelToLoad | None: ...


@dataclass(frozen=True)
class FifoScheduler:
    """First come, first served: the oldest job whose model is ready leads, the largest compatible batch joins it,
    models load in queue order, and a training slice runs only when no batch is ready."""

    rules: BatchRules

    def turn(self, batch_ready: bool, training_waiting: bool) -> Turn:
        """A ready batch first (a generation waits at most one training slice), then a training."""
        if batch_ready:
            return Turn.batch
        return Turn.training if training_waiting else Turn.idle

    def lead(self, queued: Sequence[Job], is_ready: ModelCheck) -> Job | None:
        """The oldest queued job whose model is on the device (jobs whose model loads wait without holding others)."""
        return next((job for job in queued if is_ready(job.model)), None)

    def batch(self, lead: Job, queued: Sequence[Job]) -> list[Job]:
        """``lead`` and the queued jobs that can share its pipeline call, in queue order, within the rules."""
        return companions(lead, queued, self.rules)

    def shape(self, job: Job) -> Hashable:
        """What jobs that may share a batch have in common: the call's shape, and the model where models never mix."""
        return batch_key(job), None if self.rules.across_adapters else job.model

    def model_to_load(self, queued: Sequence[Job], running: Sequence[Job], needs_loading: ModelCheck) -> ModelToLoad | None:
        """The model of the first queued job that needs loading; the checkpoints of the running batch and of the jobs
        queued ahead of it stay."""
        keep = {job.model.base for job in running}
        for job in queued:
            if needs_loading(job.model):
                return ModelToLoad(job.model, frozenset(keep))
            keep.add(job.model.base)
        return None
