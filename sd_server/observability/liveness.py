"""Liveness of the service's parts (the worker threads, the background tasks, the database), in the spirit of
cog's worker states: each part is ok, busy, failing (it goes on, but its last attempt failed) or dead (its thread
or task is gone, or it gave up for good). /health shows every part; /health/ready answers 503 naming a dead part,
or a failing part that the service cannot do without."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class PartState(str, Enum):
    """What a part is doing."""

    ok = "ok"
    busy = "busy"
    failing = "failing"
    dead = "dead"


@dataclass
class Part:
    """One part: its state, why, since when; ``alive`` tells whether its thread or task still runs."""

    state: PartState
    detail: str | None
    since: float
    alive: Callable[[], bool] | None
    critical: bool  # failing means not ready (the database); any part that is dead means not ready


class Liveness:
    """The parts' states, set from any thread, read by /health, /health/ready and the metrics."""

    def __init__(self) -> None:
        self._parts: dict[str, Part] = {}
        self._lock = threading.Lock()

    def register(self, name: str, alive: Callable[[], bool] | None = None, critical: bool = False) -> None:
        """Track a part; ``alive`` (when given) is asked at each report."""
        with self._lock:
            self._parts[name] = Part(PartState.ok, None, time.time(), alive, critical)

    def set(self, name: str, state: PartState, detail: str | None = None) -> None:
        """Record what the part is doing now (a dead part stays dead)."""
        with self._lock:
            part = self._parts.get(name)
            if part is None or part.state is PartState.dead or (part.state is state and part.detail == detail):
                return
            part.state, part.detail, part.since = state, detail, time.time()

    def report(self) -> dict[str, dict]:
        """Every part: ``{"state", "detail", "since"}``; a part whose thread or task is gone reads dead."""
        with self._lock:
            parts = dict(self._parts)
        report = {}
        for name, part in parts.items():
            gone = part.alive is not None and not part.alive()
            state = PartState.dead if gone else part.state
            detail = "its thread or task is gone" if gone and part.state is not PartState.dead else part.detail
            report[name] = {"state": state.value, "detail": detail, "since": part.since}
        return report

    def problems(self) -> list[str]:
        """What keeps the service from being ready: dead parts, and failing critical ones, as "name: why"."""
        with self._lock:
            critical = {name for name, part in self._parts.items() if part.critical}
        return [
            f"{name} is {part['state']}" + (f": {part['detail']}" if part["detail"] else "")
            for name, part in self.report().items()
            if part["state"] == PartState.dead.value or (part["state"] == PartState.failing.value and name in critical)
        ]


class Readiness:
    """Whether the service takes traffic: not before the default model has loaded, and not once it stops or its
    device is lost; ``reason`` says why not."""

    def __init__(self, reason: str = "the default model is loading") -> None:
        self.ready, self.reason = False, reason

    def set_ready(self) -> None:
        """The service takes traffic."""
        self.ready = True

    def set_not_ready(self, reason: str) -> None:
        """The service does not take traffic, for ``reason``."""
        self.ready, self.reason = False, reason
