"""POST /generate and POST /generate/image: a job submitted and waited for, answered with its images."""

import asyncio
from contextlib import suppress

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError

from schemas import GenerateRequest, GenerateResponse
from sd_server.api.dependencies import CurrentUser, QueueDep
from sd_server.api.errors import error_responses
from sd_server.api.presenters import generate_response
from sd_server.domain.jobs import Job, JobStatus
from sd_server.domain.models import DEFAULT_USER
from sd_server.errors import (
    ClientDisconnectedError,
    ConflictError,
    DeviceOutOfMemoryError,
    ForbiddenError,
    GenerationFailedError,
    JobFailedError,
    JobFinishedError,
    JobTimeoutError,
    UnknownUserError,
)
from sd_server.jobs.queue import JobQueue
from sd_server.observability.logging import request_id_var

generation_router = APIRouter(tags=["generation"])
GENERATION_ERRORS = error_responses(
    ForbiddenError, UnknownUserError, ConflictError, GenerationFailedError, DeviceOutOfMemoryError, JobTimeoutError
)


async def run_job(request: GenerateRequest, principal: CurrentUser, queue: JobQueue, http_request: Request) -> Job:
    """Queue ``request`` as a job and wait for it; a client that disconnects cancels it."""
    requested = request.user_id if "user_id" in request.model_fields_set else None
    generation = request.to_generation(principal.acting_user(requested, DEFAULT_USER))
    # The database write runs off the event loop (asyncio.to_thread copies the request-id context along).
    job, _ = await asyncio.to_thread(queue.submit, generation, synchronous=True, request_id=request_id_var.get())
    while not job.finished.is_set():
        with suppress(TimeoutError):
            async with asyncio.timeout(0.25):
                await job.finished.wait()
        if not job.finished.is_set() and await http_request.is_disconnected():
            with suppress(JobFinishedError):
                await asyncio.to_thread(queue.cancel, job)
            raise ClientDisconnectedError(f"job {job.id} cancelled: its client left")
    if job.status is JobStatus.failed:
        raise JobFailedError(job.error or "the job failed", job.error_status or 500)
    if job.status is JobStatus.cancelled:
        raise ConflictError(f"job {job.id} was cancelled (POST /jobs/{job.id}/cancel)")
    return job


@generation_router.post("/generate", responses=GENERATION_ERRORS)
async def generate(request: GenerateRequest, queue: QueueDep, principal: CurrentUser, http_request: Request) -> GenerateResponse:
    """Generate images with the user's model; they come back as base64 PNGs with their seeds."""
    job = await run_job(request, principal, queue, http_request)
    return generate_response(job, queue.storage)


@generation_router.post(
    "/generate/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG, seed and model in headers."}, **GENERATION_ERRORS},
)
async def generate_image(request: GenerateRequest, queue: QueueDep, principal: CurrentUser, http_request: Request) -> Response:
    """Generate one image and answer with the PNG itself (headers X-Seed, X-Model-Id, X-Generation-Time)."""
    if request.num_images != 1:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "num_images"), "msg": "must be 1 for /generate/image; use /generate for more", "input": request.num_images}]
        )
    job = await run_job(request, principal, queue, http_request)
    headers = {"X-Seed": str(job.seed), "X-Model-Id": job.model_id, "X-Generation-Time": f"{job.generation_seconds:.3f}"}
    return Response(content=job.take_pngs()[0], media_type="image/png", headers=headers)
