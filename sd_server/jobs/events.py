"""The event bus of all work: typed events published from any thread. Listeners (metrics, webhooks) are told on
the publishing thread; SSE subscribers of one job or training get its events on the event loop."""

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sd_server.domain.jobs import Job
from sd_server.domain.lifecycle import Work

logger = logging.getLogger(__name__)
StreamEvent = tuple[str, dict[str, Any]]  # (SSE event name, data)


@dataclass(frozen=True)
class WorkEvent:
    """Something happened to a job or a training: ``name`` is its new status, or "progress" with ``data``."""

    work: Work
    name: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """True for the event that announces the work's end (stored before it is published)."""
        return self.work.status.phase.is_terminal and self.name == self.work.status.value


@dataclass(frozen=True)
class BatchRan:
    """The device ran one batch: its images, seconds and steps."""

    images: int
    seconds: float
    steps: int


Event = WorkEvent | BatchRan
Listener = Callable[[Event], None]


class EventBus:
    """Publishes events to the listeners given at construction and to each work's SSE subscribers."""

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self._listeners = list(listeners)
        self._subscribers: dict[str, set[asyncio.Queue[StreamEvent]]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver SSE events on ``loop`` (the server's event loop)."""
        self._loop = loop

    def subscribe(self, work: Work) -> asyncio.Queue[StreamEvent]:
        """A queue that receives the work's events from now on; unsubscribe when done."""
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._subscribers[work.id].add(events)
        return events

    def unsubscribe(self, work: Work, events: asyncio.Queue[StreamEvent]) -> None:
        """Stop sending the work's events to ``events``."""
        self._subscribers[work.id].discard(events)
        if not self._subscribers[work.id]:
            del self._subscribers[work.id]

    def emit(self, work: Work, name: str, data: dict[str, Any] | None = None) -> None:
        """Publish a WorkEvent of ``work``, from any thread."""
        self.publish(WorkEvent(work, name, data or {}))

    def publish(self, event: Event) -> None:
        """Tell the listeners on this thread, then the work's subscribers on the event loop (and, at the work's end,
        whoever waits for it). A listener that fails is logged and the others are still told: no listener can stop
        work from ending."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("an event listener failed on %s", event)
        if isinstance(event, WorkEvent) and (event.ended or event.work.id in self._subscribers):
            # Only what someone waits for wakes the event loop: a step's progress of a batch nobody streams would
            # cost the loop a wake-up (and the device a stolen core) per image per step.
            assert self._loop is not None, "EventBus.bind() was not called"
            self._loop.call_soon_threadsafe(self._stream, event)

    def _stream(self, event: WorkEvent) -> None:
        """Event loop: hand the event to the work's subscribers; at its end, wake whoever waits for it."""
        for events in self._subscribers.get(event.work.id, ()):
            events.put_nowait((event.name, event.data))
        if event.ended:
            event.work.finished.set()


class Counters(Protocol):
    """What counts batches and ended jobs (the Prometheus metrics)."""

    def batch_ran(self, images: int, seconds: float, steps: int) -> None: ...

    def job_finished(self, status: str) -> None: ...

    def job_started(self, priority: str, waited_s: float) -> None: ...


def counting(counters: Counters) -> Listener:
    """A bus listener that counts each batch, each started job's wait and each ended job in ``counters``."""

    def listen(event: Event) -> None:
        if isinstance(event, BatchRan):
            counters.batch_ran(event.images, event.seconds, event.steps)
        elif event.ended and isinstance(event.work, Job):
            counters.job_finished(event.work.status.value)
        elif event.name == "started" and isinstance(event.work, Job) and (started := event.work.started_at) is not None:
            counters.job_started(event.work.priority.value, (started - event.work.created_at).total_seconds())

    return listen
