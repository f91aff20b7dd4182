"""Cross-request batching: which queued jobs can share one pipeline call."""

from sd_server.domain.jobs import Job
from sd_server.engine.interface import BatchItem, BatchKey


def batch_key(job: Job) -> BatchKey:
    """What a job must share with others to run in the same pipeline call."""
    request = job.request
    return BatchKey(
        job.model, request.width, request.height, request.num_inference_steps, request.guidance_scale, request.scheduler
    )


def companions(first: Job, queued: list[Job], max_images: int) -> list[Job]:
    """``first`` and the queued jobs that can share its pipeline call, in queue order, within ``max_images``."""
    key, taken, images = batch_key(first), [first], first.images_requested
    for job in queued:
        if job is not first and batch_key(job) == key and images + job.images_requested <= max_images:
            taken.append(job)
            images += job.images_requested
    return taken


def batch_items(batch: list[Job]) -> list[BatchItem]:
    """Each job's prompts and first seed, as the engine takes them."""
    return [BatchItem(job.request.prompt, job.request.negative_prompt, job.seed, job.images_requested) for job in batch]


def images_in(batch: list[Job]) -> int:
    """Images the batch makes."""
    return sum(job.images_requested for job in batch)
