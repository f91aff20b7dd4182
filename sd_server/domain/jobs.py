"""Job records: one generation from submission to its images (or error), and how jobs are listed."""

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Protocol, overload

from sd_server.domain.generation import Generation
from sd_server.domain.lifecycle import Phase
from sd_server.domain.models import CheckpointModel, UserModel

JOB_ID = re.compile(r"[0-9a-f]{32}")  # a job's id: a random UUID's hex


def utc_now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(timezone.utc)


@overload
def as_utc(moment: datetime) -> datetime: ...


@overload
def as_utc(moment: None) -> None: ...


def as_utc(moment: datetime | None) -> datetime | None:
    """``moment`` as an aware UTC datetime (SQLite hands back naive ones)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


class JobStatus(str, Enum):
    """Where a job is in its life: queued, running, then succeeded, failed or cancelled (terminal)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def phase(self) -> Phase:
        """The lifecycle phase this status stands for (a job's statuses are the phases it goes through)."""
        return Phase(self.value)

    @property
    def is_terminal(self) -> bool:
        """True once the job can change no more."""
        return self.phase.is_terminal


class WebhookEvent(str, Enum):
    """What a job's webhook is POSTed at: its first step, its progress (throttled), its end."""

    start = "start"
    progress = "progress"
    completed = "completed"


class Priority(str, Enum):
    """A job's class: every queued ``interactive`` job leads before any ``batch`` one."""

    interactive = "interactive"
    batch = "batch"


@dataclass
class StoredImage:
    """One image of a job: its seed, storage key (None: not stored), size and checksum; ``png`` while held."""

    seed: int
    key: str | None
    size_bytes: int
    sha256: str
    png: bytes = b""


@dataclass
class Job:
    """One generation request, from submission to its images (or error)."""

    request: Generation
    model_id: str
    seed: int
    synchronous: bool
    webhook_url: str | None = None
    idempotency_key: str | None = None
    fingerprint: str = ""
    request_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.queued
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = 0
    total_steps: int = 0
    batch_size: int | None = None
    attempts: int = 0
    scheduler_used: str | None = None
    generation_seconds: float | None = None
    images: list[StoredImage] = field(default_factory=list)
    error: str | None = None
    error_status: int | None = None
    cancel_requested: bool = False
    finish_requested: bool = False  # stop at the next step and keep what was made (A1111's interrupt)
    deleted: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    model: UserModel = None  # type: ignore[assignment]  # the user's model at submission; left out: the checkpoint ``model_id``
    inputs: dict[str, bytes] = field(default_factory=dict)  # "init", "mask" (PNGs), "credentials" (as uploaded), while held
    prompt_chunks: int = 1  # 77-token chunks its longer prompt takes (jobs of one batch take as many)
    priority: Priority = Priority.interactive
    weight: float = 1.0  # its user's share of the device relative to others (the submitting key's weight)
    tenant: str = ""  # whose limits of queued cost it counts against (the key's owner); left out: its user
    key_id: str | None = None  # the API key that submitted it: its secret signs the webhooks
    webhook_events: frozenset[WebhookEvent] = frozenset({WebhookEvent.completed})
    preview: bytes | None = None  # a JPEG of its first image at the last preview step, while it runs

    def __post_init__(self) -> None:
        self.total_steps = self.total_steps or self.request.total_steps
        self.model = self.model or CheckpointModel(source=self.model_id)
        self.tenant = self.tenant or self.request.user_id

    @property
    def user_id(self) -> str:
        """Whose job this is."""
        return self.request.user_id

    @property
    def images_requested(self) -> int:
        """How many images the job makes."""
        return self.request.num_images

    @property
    def cost(self) -> int:
        """What it takes of the device, in pixel-steps (``Generation.cost``)."""
        return self.request.cost

    @property
    def input_keys(self) -> dict[str, str]:
        """The storage keys of its init image and mask (img2img and inpainting), and of the init image as uploaded
        when it carried credentials, by name."""
        image_input = self.request.image_input
        if image_input is None:
            return {}
        names = ["init", "mask"] if image_input.mask_sha256 else ["init"]
        keys = {name: f"{self.id}-{name}.png" for name in names}
        if image_input.init_credentials:
            keys["credentials"] = f"{self.id}-init-as-uploaded"
        return keys

    def take_pngs(self) -> list[bytes]:
        """The encoded images, handed over once: the record keeps only keys and checksums after this."""
        pngs = [image.png for image in self.images]
        for image in self.images:
            image.png = b""
        return pngs


@dataclass(frozen=True)
class JobQuery:
    """Which jobs to list, newest first: filters, then a page by cursor (or offset)."""

    user_id: str | None = None
    status: JobStatus | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 20
    offset: int = 0
    cursor: tuple[datetime, str] | None = None


class JobStore(Protocol):
    """Keeps job records: the live object of every active job, and every job durably."""

    def add(self, job: Job) -> Job: ...

    def save(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def delete(self, job_id: str) -> Job | None: ...

    def find_by_idempotency_key(self, key: str) -> Job | None: ...

    def page(self, query: JobQuery) -> tuple[list[Job], int, tuple[datetime, str] | None]: ...

    def owner_of_image(self, key: str) -> str | None: ...

    def unfinished(self) -> list[Job]: ...

    def finished_before(self, cutoff: datetime) -> list[Job]: ...
