"""The one rule of recovery at start, for jobs and trainings alike: queued work queues again; work that was
running when the last run stopped runs once more, and fails if it was interrupted before (it may be what stops the
server)."""

from enum import Enum

from sd_server.domain.lifecycle import Phase


class Restart(str, Enum):
    """What happens to unfinished work at start."""

    queue = "queue"  # queue it again as it was
    retry = "retry"  # queue it again, one attempt used
    fail = "fail"  # interrupted twice: fail it


def on_restart(phase: Phase, attempts: int) -> Restart:
    """What to do with work the last run left in ``phase`` after ``attempts`` interrupted runs."""
    if phase is Phase.queued:
        return Restart.queue
    return Restart.fail if attempts >= 1 else Restart.retry
