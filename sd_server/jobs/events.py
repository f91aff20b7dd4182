"""Job events: emitted from any thread, delivered on the event loop to SSE subscribers and end-of-job listeners."""

import asyncio
from collections import defaultdict
from collections.abc import Callable

from sd_server.domain.jobs import Job

Event = tuple[str, dict]  # (SSE event name, data)


class JobEvents:
    """Per-job subscriber queues, and listeners told when a job ends (webhooks)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._terminal_listeners: list[Callable[[Job], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events on ``loop`` (the server's event loop)."""
        self._loop = loop

    def on_terminal(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` on the event loop whenever a job ends."""
        self._terminal_listeners.append(listener)

    def subscribe(self, job: Job) -> asyncio.Queue[Event]:
        """A queue that receives the job's events from now on; unsubscribe when done."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[job.id].add(events)
        return events

    def unsubscribe(self, job: Job, events: asyncio.Queue[Event]) -> None:
        """Stop sending the job's events to ``events``."""
        self._subscribers[job.id].discard(events)
        if not self._subscribers[job.id]:
            del self._subscribers[job.id]

    def emit(self, job: Job, name: str, data: dict | None = None) -> None:
        """Send an event to the job's subscribers, from any thread."""
        assert self._loop is not None, "JobEvents.bind() was not called"
        self._loop.call_soon_threadsafe(self._publish, job, (name, data or {}))

    def _publish(self, job: Job, event: Event) -> None:
        """Event loop: hand ``event`` to the job's subscribers; on a terminal one, wake waiters and listeners."""
        for events in self._subscribers.get(job.id, ()):
            events.put_nowait(event)
        if job.status.is_terminal and event[0] == job.status.value:
            job.finished.set()
            for listener in self._terminal_listeners:
                listener(job)
