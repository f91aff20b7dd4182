"""The jobs API: submit, list, read, follow (Server-Sent Events), cancel and delete jobs."""

import asyncio
import base64
import binascii
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from schemas import JobCreated, JobList, JobRequest, JobResponse
from sd_server.api.dependencies import (
    BusDep,
    CurrentUser,
    DecodingDep,
    JobDep,
    JobsDep,
    LookupsDep,
    SettingsDep,
    StorageDep,
    StylesDep,
)
from sd_server.api.errors import error_responses
from sd_server.api.presenters import job_links, job_response
from sd_server.api.sse import event_response, follow
from sd_server.api.submissions import checked_webhook, share_of, submission
from sd_server.domain.jobs import JOB_ID, JobQuery, JobStatus, as_utc
from sd_server.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UnknownUserError,
    first_line,
)
from sd_server.observability.logging import request_id_var

jobs_router = APIRouter(prefix="/jobs", tags=["jobs"])
MAX_OFFSET = 2**31 - 1  # past it databases overflow; past the total, pages are empty anyway
JOB_ERRORS = error_responses(NotFoundError, ConflictError)


@jobs_router.post("", status_code=202, responses=error_responses(ForbiddenError, UnknownUserError, ConflictError))
async def create_job(
    body: JobRequest,
    jobs: JobsDep,
    settings: SettingsDep,
    principal: CurrentUser,
    styles: StylesDep,
    decoding: DecodingDep,
    lookups: LookupsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="Retrying with the same key returns the same job.")] = None,
) -> JobCreated:
    """Queue a generation (text-to-image, img2img or inpainting, as POST /generate takes them) and answer at once;
    follow it at `links.self` or `links.events`."""
    generation, inputs = await submission(body, principal, styles, decoding)
    webhook_url = await checked_webhook(body.webhook_url, lookups, settings.webhook_allow_private)
    share = share_of(principal, body.priority)
    events = frozenset(body.webhook_events_filter)
    job, _ = await asyncio.to_thread(jobs.submit, generation, False, webhook_url, idempotency_key, request_id_var.get(), inputs, share, events)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobCreated(job_id=job.id, status=job.status, position=jobs.position(job), links=job_links(job))


@jobs_router.get("")
async def list_jobs(
    jobs: JobsDep,
    storage: StorageDep,
    principal: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Prefer cursor: it is stable while jobs are added.")] = 0,
    user_id: Annotated[str | None, Query(description="Only this user's jobs.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    created_after: Annotated[datetime | None, Query(description="ISO 8601; inclusive.")] = None,
    created_before: Annotated[datetime | None, Query(description="ISO 8601; exclusive.")] = None,
) -> JobList:
    """Jobs newest first, filtered; follow `next_cursor` for the next page. A user key sees its own jobs only."""
    if not principal.is_admin:
        user_id = principal.user_id
    after, before = instant(created_after, "created_after"), instant(created_before, "created_before")
    query = JobQuery(user_id, status, after, before, limit, offset, decode_cursor(cursor))
    page, total, next_cursor = await asyncio.to_thread(jobs.page, query)
    return JobList(
        jobs=[job_response(job, jobs.position(job), storage) for job in page],
        total=total,
        limit=limit,
        offset=offset,
        next_cursor=encode_cursor(next_cursor),
    )


def instant(moment: datetime | None, name: str) -> datetime | None:
    """``moment`` in UTC (without an offset, it is taken as UTC); 422 for one that has no UTC equivalent."""
    try:
        return as_utc(moment)
    except OverflowError as error:
        message = "must be a time between the years 1 and 9999 in UTC"
        raise RequestValidationError([{"type": "value_error", "loc": ("query", name), "msg": message, "input": str(moment)}]) from error


def encode_cursor(position: tuple[datetime, str] | None) -> str | None:
    """An opaque cursor for the page after the job at ``position`` (its creation time and id)."""
    if position is None:
        return None
    return base64.urlsafe_b64encode(f"{position[0].isoformat()}|{position[1]}".encode()).decode()


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    """The position a cursor stands for; 422 when it is not one of ours (not base64, no time and id, a time with no
    UTC equivalent, an id no job can have)."""
    if cursor is None:
        return None
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"{job_id[:40]!r} is not a job id")
        return as_utc(datetime.fromisoformat(created)), job_id
    except (ValueError, OverflowError, binascii.Error) as error:
        message = f"invalid cursor: pass next_cursor from the previous page ({first_line(error)})"
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "cursor"), "msg": message, "input": None}]) from error


@jobs_router.get("/{job_id}", responses=error_responses(NotFoundError))
async def get_job(job: JobDep, jobs: JobsDep, storage: StorageDep) -> JobResponse:
    """The job's status, progress, position while queued, and result or error."""
    return job_response(job, jobs.position(job), storage)


@jobs_router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "queued, started, progress..., then succeeded, failed or cancelled."},
        **error_responses(NotFoundError),
    },
)
async def job_events(job: JobDep, jobs: JobsDep, storage: StorageDep, bus: BusDep) -> StreamingResponse:
    """Server-Sent Events: the current state first, then each change; the stream ends with the job."""
    state = lambda: job.status.value if job.status.is_terminal else ("started" if job.started_at else "queued")  # noqa: E731
    return event_response(follow(bus, job, state, lambda: job_response(job, jobs.position(job), storage).model_dump(mode="json")))


@jobs_router.post("/{job_id}/cancel", responses=JOB_ERRORS)
async def cancel_job(job: JobDep, jobs: JobsDep, storage: StorageDep) -> JobResponse:
    """Cancel: a queued job leaves the queue now; a running one stops at its next step. 409 once ended."""
    await asyncio.to_thread(jobs.cancel, job)
    return job_response(job, jobs.position(job), storage)


@jobs_router.delete("/{job_id}", status_code=204, responses=error_responses(NotFoundError))
async def delete_job(job: JobDep, jobs: JobsDep) -> Response:
    """Cancel the job if it is still active, then delete it and its images."""
    await asyncio.to_thread(jobs.delete, job)
    return Response(status_code=204)
