"""Server-Sent Events of a job or a training: its state now, then each change, until it ends."""

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from sd_server.domain.jobs import Job
from sd_server.domain.trainings import Training
from sd_server.jobs.events import EventBus

DATA_EVENTS = ("progress", "samples")  # events that carry their own data, as often as they happen

def sse(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def event_response(stream: AsyncIterator[str]) -> StreamingResponse:
    """A streaming answer of SSE text that proxies pass through unbuffered."""
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def follow(
    events: EventBus, subject: Job | Training, state: Callable[[], str], present: Callable[[], dict[str, Any]]
) -> AsyncIterator[str]:
    """The subject's ``state()`` now with ``present()``, then each event (progress and samples with their own data,
    the others with ``present()``), until the terminal one. The state is read once subscribed, so no change falls
    between."""
    queue = events.subscribe(subject)
    try:
        first = state()
        yield sse(first, present())
        sent = {first}
        while not subject.status.is_terminal or subject.status.value not in sent:
            name, data = await queue.get()
            if name in sent and name not in DATA_EVENTS:
                continue  # already told in the first event
            sent.add(name)
            yield sse(name, data if name in DATA_EVENTS else present())
    finally:
        events.unsubscribe(subject, queue)
