"""FastAPI dependencies: the service objects created in the lifespan, and jobs looked up by id."""

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from job_queue import JobQueue
from jobs import Job
from model_service import ModelService


def get_model_service(request: Request) -> ModelService:
    """The one ModelService, created in the lifespan."""
    return request.app.state.model_service


def get_job_queue(request: Request) -> JobQueue:
    """The one JobQueue, created in the lifespan."""
    return request.app.state.job_queue


ServiceDep = Annotated[ModelService, Depends(get_model_service)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]


def get_job(job_id: Annotated[str, Path(description="The id POST /jobs answered.")], queue: QueueDep) -> Job:
    """The job with that id; 404 when there is none."""
    job = queue.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job '{job_id}' (deleted, or removed by SD_RETENTION_DAYS)")
    return job


JobDep = Annotated[Job, Depends(get_job)]
