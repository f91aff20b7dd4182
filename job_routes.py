"""Routes of the asynchronous API: jobs, their event streams, and stored images."""

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from dependencies import CurrentUser, JobDep, QueueDep
from job_queue import JobQueue
from jobs import Job, JobQuery, StoredImage
from middleware import request_id_var
from schemas import (
    GenerateRequest,
    JobCreated,
    JobImage,
    JobLinks,
    JobList,
    JobProgress,
    JobRequest,
    JobResponse,
    JobResult,
    JobStatus,
)
from storage import ImageStorage, LocalStorage
from webhooks import check_webhook_url

jobs_router = APIRouter(prefix="/jobs", tags=["jobs"])
images_router = APIRouter(tags=["images"])

ERRORS = {
    404: {"description": "No such job."},
    409: {"description": "The job has already ended, or the Idempotency-Key was used for another body."},
}


def job_links(job: Job) -> JobLinks:
    """The URLs to follow a job."""
    return JobLinks(self=f"/jobs/{job.id}", events=f"/jobs/{job.id}/events", cancel=f"/jobs/{job.id}/cancel")


def image_path(image: StoredImage, storage: ImageStorage) -> str | None:
    """Where the image lies on the server: None when it was not stored, or is stored remotely."""
    path = storage.local_path(image.key) if image.key else None
    return str(path) if path else None


def job_result(job: Job, storage: ImageStorage) -> JobResult | None:
    """A succeeded job's result, with image URLs (presigned with S3) instead of base64; None before that."""
    parameters = job.parameters
    if parameters is None or not job.images:
        return None
    images = [
        JobImage(url=storage.url(image.key) if image.key else None, seed=image.seed, image_path=image_path(image, storage))
        for image in job.images
    ]
    return JobResult(
        image_url=images[0].url,
        images=images,
        seed=job.seed,
        model_id=job.model_id,
        user_id=job.request.user_id,
        generation_time=round(job.generation_seconds or 0.0, 3),
        image_path=images[0].image_path,
        parameters=parameters,
    )


def job_response(job: Job, queue: JobQueue) -> JobResponse:
    """The job as the API shows it."""
    return JobResponse(
        job_id=job.id,
        status=job.status,
        user_id=job.request.user_id,
        model_id=job.model_id,
        position=queue.position(job),
        progress=JobProgress(step=job.step, total=job.total_steps),
        batch_size=job.batch_size,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result=job_result(job, queue.storage),
        error=job.error,
        links=job_links(job),
    )


@jobs_router.post(
    "",
    status_code=202,
    responses={
        404: {"description": "The user has no model."},
        409: ERRORS[409],
        429: {"description": "The queue is full, or a rate limit or job cap was reached; see Retry-After."},
    },
)
async def create_job(
    body: JobRequest,
    queue: QueueDep,
    principal: CurrentUser,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="Retrying with the same key returns the same job.")] = None,
) -> JobCreated:
    """Queue a generation and answer at once; follow it at `links.self` or `links.events`."""
    fields = body.model_dump(exclude={"webhook_url"}, exclude_unset=True)
    request = principal.resolve_user(GenerateRequest.model_validate(fields))
    webhook_url = str(body.webhook_url) if body.webhook_url else None
    if webhook_url:
        await asyncio.to_thread(check_webhook_url, webhook_url, queue.settings.webhook_allow_private)
    job, _ = await asyncio.to_thread(queue.submit, request, False, webhook_url, idempotency_key, request_id_var.get())
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobCreated(job_id=job.id, status=job.status, position=queue.position(job), links=job_links(job))


@jobs_router.get("", responses={422: {"description": "A filter or the cursor is invalid."}})
async def list_jobs(
    queue: QueueDep,
    principal: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    offset: Annotated[int, Query(ge=0, description="Prefer cursor: it is stable while jobs are added.")] = 0,
    user_id: Annotated[str | None, Query(description="Only this user's jobs.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    created_after: Annotated[datetime | None, Query(description="ISO 8601; inclusive.")] = None,
    created_before: Annotated[datetime | None, Query(description="ISO 8601; exclusive.")] = None,
) -> JobList:
    """Jobs newest first, filtered; follow `next_cursor` for the next page. A user key sees its own jobs only."""
    if not principal.is_admin:
        user_id = principal.user_id
    query = JobQuery(user_id, status, created_after, created_before, limit, offset, decode_cursor(cursor))
    jobs, total, next_cursor = await asyncio.to_thread(queue.store.page, query)
    return JobList(
        jobs=[job_response(job, queue) for job in jobs],
        total=total,
        limit=limit,
        offset=offset,
        next_cursor=encode_cursor(next_cursor),
    )


def encode_cursor(position: tuple[datetime, str] | None) -> str | None:
    """An opaque cursor for the page after the job at ``position`` (its creation time and id)."""
    if position is None:
        return None
    return base64.urlsafe_b64encode(f"{position[0].isoformat()}|{position[1]}".encode()).decode()


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    """The position a cursor stands for; 422 when it is not one of ours."""
    if cursor is None:
        return None
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created), job_id
    except (ValueError, binascii.Error) as error:
        message = f"invalid cursor: pass next_cursor from the previous page ({error})"
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "cursor"), "msg": message, "input": cursor}]) from error


@jobs_router.get("/{job_id}", responses={404: ERRORS[404]})
async def get_job(job: JobDep, queue: QueueDep) -> JobResponse:
    """The job's status, progress, position while queued, and result or error."""
    return job_response(job, queue)


@jobs_router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "queued, started, progress..., then succeeded, failed or cancelled."}, 404: ERRORS[404]},
)
async def job_events(job: JobDep, queue: QueueDep) -> StreamingResponse:
    """Server-Sent Events: the current state first, then each change; the stream ends with the job."""
    return StreamingResponse(
        event_stream(job, queue), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def event_stream(job: Job, queue: JobQueue) -> AsyncIterator[str]:
    """The job's events as SSE text: its current state, then what happens next, until a terminal event."""
    events = queue.subscribe(job)
    try:
        current = job.status.value if job.status.is_terminal else ("started" if job.started_at else "queued")
        yield sse(current, job_response(job, queue).model_dump(mode="json"))
        sent = {current}
        while not job.status.is_terminal or job.status.value not in sent:
            name, data = await events.get()
            if name in sent and name != "progress":
                continue  # already told in the first event
            sent.add(name)
            yield sse(name, data if name == "progress" else job_response(job, queue).model_dump(mode="json"))
    finally:
        queue.unsubscribe(job, events)


def sse(event: str, data: dict) -> str:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@jobs_router.post("/{job_id}/cancel", responses=ERRORS)
async def cancel_job(job: JobDep, queue: QueueDep) -> JobResponse:
    """Cancel: a queued job leaves the queue now; a running one stops at its next step. 409 once ended."""
    await asyncio.to_thread(queue.cancel, job)
    return job_response(job, queue)


@jobs_router.delete("/{job_id}", status_code=204, responses={404: ERRORS[404]})
async def delete_job(job: JobDep, queue: QueueDep) -> Response:
    """Cancel the job if it is still active, then delete it and its images."""
    await asyncio.to_thread(queue.delete, job)
    return Response(status_code=204)


@images_router.get(
    "/images/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The stored PNG (local storage)."},
        307: {"description": "Redirect to a presigned URL (S3 storage)."},
        404: {"description": "No such image."},
    },
)
async def get_image(
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]+\.png$")], queue: QueueDep, principal: CurrentUser
) -> Response:
    """A stored image of the caller's, by the name in a job's result: the file, or a redirect to its presigned URL."""
    storage = queue.storage
    owner = await asyncio.to_thread(queue.store.owner_of_image, name)
    if owner is None or not principal.can_access(owner) or not await asyncio.to_thread(storage.exists, name):
        raise HTTPException(404, f"no image '{name}'")
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.local_path(name), media_type="image/png")
    return RedirectResponse(storage.url(name), status_code=307)
