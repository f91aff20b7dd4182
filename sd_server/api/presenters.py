"""Presenters: a job (or its images) or a training as the API shows it, written once for every route, event and webhook."""

import base64
from dataclasses import asdict
from typing import Any

from schemas import (
    GeneratedImage,
    GenerateResponse,
    GenerationParameters,
    JobImage,
    JobLinks,
    JobProgress,
    JobResponse,
    JobResult,
    ProgressSamples,
    TrainingLinks,
    TrainingParameters,
    TrainingProgress,
    TrainingResponse,
)
from sd_server.domain.jobs import Job, StoredImage
from sd_server.domain.trainings import Training
from sd_server.jobs.trainings import progress, sample_urls
from sd_server.jobs.workers import watermark_fingerprint
from sd_server.storage.images import ImageStorage


def job_links(job: Job) -> JobLinks:
    """The URLs to follow a job."""
    return JobLinks(self=f"/jobs/{job.id}", events=f"/jobs/{job.id}/events", cancel=f"/jobs/{job.id}/cancel")


def parameters(job: Job) -> GenerationParameters | None:
    """The effective parameters, once the job has run (the scheduler is resolved then)."""
    if job.scheduler_used is None:
        return None
    request = job.request
    fields = {name: value for name, value in asdict(request).items() if name not in ("seed", "scheduler", "image_input", "styles")}
    image_input = request.image_input
    inpainting = {}
    if image_input and image_input.mask_sha256:
        inpainting = {name: getattr(image_input, name) for name in ("mask_blur", "inpaint_full_res", "inpaint_full_res_padding")}
    return GenerationParameters(
        **fields,
        **inpainting,
        seed=job.seed,
        scheduler=job.scheduler_used,
        mode=request.mode,
        styles=list(request.styles),
        strength=image_input.strength if image_input else None,
    )


def image_path(image: StoredImage, storage: ImageStorage) -> str | None:
    """Where the image lies on the server: None when it was not stored, or is stored remotely."""
    path = storage.local_path(image.key) if image.key else None
    return str(path) if path else None


def outcome(job: Job) -> dict[str, Any]:
    """What every answer about a finished generation says: seed, model, user, time, effective parameters."""
    return {
        "seed": job.seed,
        "model_id": job.model_id,
        "user_id": job.user_id,
        "generation_time": round(job.generation_seconds or 0.0, 3),
        "parameters": parameters(job),
    }


def watermark_fingerprints(job: Job) -> list[str]:
    """The fingerprint each of a finished job's images carries in its watermark (whether or not it is on)."""
    return [watermark_fingerprint(job, job.scheduler_used or "", index) for index in range(len(job.images))]


def job_result(job: Job, storage: ImageStorage) -> JobResult | None:
    """A succeeded job's result, with image URLs (presigned with S3) instead of base64; None before that."""
    if job.scheduler_used is None or not job.images:
        return None
    images = [
        JobImage(url=storage.url(image.key) if image.key else None, seed=image.seed, image_path=image_path(image, storage), watermark_fingerprint=mark)
        for image, mark in zip(job.images, watermark_fingerprints(job))
    ]
    return JobResult(image_url=images[0].url, images=images, image_path=images[0].image_path, **outcome(job))


def job_response(job: Job, position: int | None, storage: ImageStorage) -> JobResponse:
    """The job as the API shows it (``position``: in the queue, while queued)."""
    return JobResponse(
        job_id=job.id,
        status=job.status,
        user_id=job.user_id,
        model_id=job.model_id,
        position=position,
        priority=job.priority,
        progress=JobProgress(step=job.step, total=job.total_steps),
        batch_size=job.batch_size,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result=job_result(job, storage),
        error=job.error,
        links=job_links(job),
    )


def generate_response(job: Job, storage: ImageStorage) -> GenerateResponse:
    """A finished synchronous job as POST /generate answers it: its images as base64 PNGs (handed over once)."""
    images = [
        GeneratedImage(image_base64=base64.b64encode(png).decode("ascii"), seed=image.seed, image_path=image_path(image, storage), watermark_fingerprint=mark)
        for png, image, mark in zip(job.take_pngs(), job.images, watermark_fingerprints(job))
    ]
    return GenerateResponse(image_base64=images[0].image_base64, images=images, image_path=images[0].image_path, **outcome(job))


def training_links(training: Training) -> TrainingLinks:
    """The URLs to follow a training."""
    path = f"/trainings/{training.id}"
    return TrainingLinks(self=path, events=f"{path}/events", cancel=f"{path}/cancel")


def training_response(training: Training) -> TrainingResponse:
    """The training as the API (its routes, events and webhook) shows it."""
    return TrainingResponse(
        training_id=training.id,
        status=training.status,
        user_id=training.user_id,
        base=training.base,
        photos=training.photo_count,
        progress=TrainingProgress(**progress(training)),
        settings=TrainingParameters(**asdict(training.settings)),
        created_at=training.created_at,
        started_at=training.started_at,
        finished_at=training.finished_at,
        samples=sample_urls(training),
        progress_samples=[ProgressSamples(step=step, samples=sample_urls(training, step)) for step in sorted(training.progress_samples)],
        warnings=training.warnings,
        scores=training.scores,
        model=training.model,
        error=training.error,
        links=training_links(training),
    )
