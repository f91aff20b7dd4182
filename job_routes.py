"""Routes of the asynchronous API: jobs, their event streams, and stored images."""

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response
from fastapi.responses import FileResponse, StreamingResponse

from dependencies import JobDep, QueueDep
from job_queue import JobQueue
from jobs import Job
from schemas import GenerateRequest, JobCreated, JobImage, JobLinks, JobList, JobProgress, JobRequest, JobResponse, JobResult

jobs_router = APIRouter(prefix="/jobs", tags=["jobs"])
images_router = APIRouter(tags=["images"])

ERRORS = {
    404: {"description": "No such job."},
    409: {"description": "The job has already ended, or the Idempotency-Key was used for another body."},
}


def job_links(job: Job) -> JobLinks:
    """The URLs to follow a job."""
    return JobLinks(self=f"/jobs/{job.id}", events=f"/jobs/{job.id}/events", cancel=f"/jobs/{job.id}/cancel")


def job_result(job: Job) -> JobResult | None:
    """A succeeded job's result, with image URLs instead of base64; None before that."""
    if job.parameters is None or not job.images:
        return None
    images = [
        JobImage(
            url=f"/images/{image.path.name}" if image.path else None,
            seed=image.seed,
            image_path=str(image.path) if image.path else None,
        )
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
        parameters=job.parameters,
    )


def job_response(job: Job, position: int | None) -> JobResponse:
    """The job as the API shows it."""
    return JobResponse(
        job_id=job.id,
        status=job.status,
        user_id=job.request.user_id,
        model_id=job.model_id,
        position=position,
        progress=JobProgress(step=job.step, total=job.total_steps),
        batch_size=job.batch_size,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result=job_result(job),
        error=job.error,
        links=job_links(job),
    )


@jobs_router.post("", status_code=202, responses={404: {"description": "The user has no model."}, 409: ERRORS[409], 429: {"description": "The queue is full; see Retry-After."}})
async def create_job(
    body: JobRequest,
    queue: QueueDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="Retrying with the same key returns the same job.")] = None,
) -> JobCreated:
    """Queue a generation and answer at once; follow it at `links.self` or `links.events`."""
    request = GenerateRequest.model_validate(body.model_dump(exclude={"webhook_url"}))
    webhook_url = str(body.webhook_url) if body.webhook_url else None
    job, _ = queue.submit(request, synchronous=False, webhook_url=webhook_url, idempotency_key=idempotency_key)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobCreated(job_id=job.id, status=job.status, position=queue.position(job), links=job_links(job))


@jobs_router.get("")
async def list_jobs(
    queue: QueueDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    user_id: Annotated[str | None, Query(description="Only this user's jobs.")] = None,
) -> JobList:
    """Recent jobs, newest first."""
    jobs, total = queue.store.page(limit, offset, user_id)
    return JobList(jobs=[job_response(job, queue.position(job)) for job in jobs], total=total, limit=limit, offset=offset)


@jobs_router.get("/{job_id}", responses={404: ERRORS[404]})
async def get_job(job: JobDep, queue: QueueDep) -> JobResponse:
    """The job's status, progress, position while queued, and result or error."""
    return job_response(job, queue.position(job))


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
        yield sse(current, job_response(job, queue.position(job)).model_dump(mode="json"))
        sent = {current}
        while not job.status.is_terminal or job.status.value not in sent:
            name, data = await events.get()
            if name in sent and name != "progress":
                continue  # already told in the first event
            sent.add(name)
            yield sse(name, data if name == "progress" else job_response(job, queue.position(job)).model_dump(mode="json"))
    finally:
        queue.unsubscribe(job, events)


def sse(event: str, data: dict) -> str:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@jobs_router.post("/{job_id}/cancel", responses=ERRORS)
async def cancel_job(job: JobDep, queue: QueueDep) -> JobResponse:
    """Cancel: a queued job leaves the queue now; a running one stops at its next step. 409 once ended."""
    queue.cancel(job)
    return job_response(job, queue.position(job))


@jobs_router.delete("/{job_id}", status_code=204, responses={404: ERRORS[404]})
async def delete_job(job: JobDep, queue: QueueDep) -> Response:
    """Cancel the job if it is still active, then delete it and its images."""
    if not job.status.is_terminal:
        queue.cancel(job)
    queue.store.delete(job.id)
    for path in job.image_paths():
        path.unlink(missing_ok=True)
    return Response(status_code=204)


@images_router.get(
    "/images/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The stored PNG."}, 404: {"description": "No such image."}},
)
async def get_image(name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]+\.png$")], queue: QueueDep) -> FileResponse:
    """A stored image, by the name in a job's result."""
    path = queue.settings.output_dir / name
    if not path.is_file():
        raise HTTPException(404, f"no image '{name}'")
    return FileResponse(path, media_type="image/png")
