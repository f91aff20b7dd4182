"""Jobs: the POST /jobs request, a job as the API shows it, pages of jobs."""

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from sd_server.domain.jobs import JobStatus, Priority, WebhookEvent
from sd_server.domain.models import Text

StyleName = Annotated[Text, Field(min_length=1, max_length=100)]
from sd_server.api.schemas.generation import GENERATE_EXAMPLE, GenerateRequest, GenerationParameters


class JobRequest(GenerateRequest):
    """A generation to run in the background; the same fields as POST /generate, plus a webhook."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**GENERATE_EXAMPLE, "webhook_url": "https://example.com/hooks/sd-jobs"}]}
    )

    webhook_url: HttpUrl | None = Field(
        None,
        description="POSTed the job JSON at the events of webhook_events_filter, signed the Standard Webhooks way "
        "(webhook-id, webhook-timestamp, webhook-signature) with the key's webhook secret.",
    )
    webhook_events_filter: list[WebhookEvent] = Field(
        [WebhookEvent.completed],
        min_length=1,
        max_length=3,
        description="When the webhook is POSTed: start (the first step), progress (at most every "
        "SD_WEBHOOK_PROGRESS_INTERVAL_S), completed (succeeded, failed or cancelled).",
    )
    priority: Priority | None = Field(
        None,
        description="batch: the job leads only once no interactive job is queued (bulk work that nobody waits for). "
        "Left out: the key's class (interactive unless the key was made with batch).",
    )


class JobLinks(BaseModel):
    """Where to follow a job."""

    self: str
    events: str
    cancel: str


class JobCreated(BaseModel):
    """The answer to POST /jobs."""

    job_id: str
    status: JobStatus
    position: int | None = Field(..., description="1 = next to run; null once it runs.")
    links: JobLinks


class JobProgress(BaseModel):
    """Denoising steps done, of how many."""

    step: int
    total: int


class JobImage(BaseModel):
    """One image of a finished job."""

    url: str | None = Field(..., description="GET this for the PNG (null when the image was not stored).")
    seed: int
    image_path: str | None
    watermark_fingerprint: str | None = Field(
        None, description="The fingerprint this image's watermark carries (what POST /provenance/verify reads back)."
    )


class JobResult(BaseModel):
    """What POST /generate answers, with URLs instead of base64."""

    image_url: str | None
    images: list[JobImage]
    seed: int
    model_id: str
    user_id: str
    generation_time: float
    image_path: str | None
    parameters: GenerationParameters


class JobResponse(BaseModel):
    """A job's state, progress and, once it ends, its result or error."""

    job_id: str
    status: JobStatus
    user_id: str
    model_id: str
    position: int | None
    priority: Priority
    progress: JobProgress
    batch_size: int | None = Field(..., description="Images in the pipeline call this job ran in.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JobResult | None
    error: str | None
    links: JobLinks


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[JobResponse]
    total: int = Field(..., description="Jobs that match the filters, on every page.")
    limit: int
    offset: int
    next_cursor: str | None = Field(..., description="Pass as cursor for the next page; null on the last.")
