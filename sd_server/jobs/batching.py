"""Cross-request batching: which queued jobs can share one pipeline call. Jobs on one base checkpoint with the same
call shape (size, steps, CFG, sampler, mode, strength, prompt length in chunks) share it even when their LoRAs differ (each image runs with its own adapter), up to SD_MAX_ADAPTERS
distinct LoRAs, so that every adapter of a batch can be resident at once."""

from collections.abc import Sequence
from dataclasses import dataclass

from sd_server.domain.jobs import Job
from sd_server.domain.models import LoraModel
from sd_server.engine.interface import BatchItem, BatchKey, ImageSource


@dataclass(frozen=True)
class BatchRules:
    """How big a batch may grow: images, distinct LoRAs, and whether different models of one base may mix."""

    max_images: int
    max_adapters: int
    across_adapters: bool = True


def batch_key(job: Job) -> BatchKey:
    """What a job must share with others to run in the same pipeline call."""
    request = job.request
    return BatchKey(
        job.model.base,
        request.width,
        request.height,
        request.num_inference_steps,
        request.guidance_scale,
        request.scheduler,
        request.mode,
        request.strength,
        job.prompt_chunks,
        request.hires,
    )


def companions(first: Job, queued: Sequence[Job], rules: BatchRules) -> list[Job]:
    """``first`` and the queued jobs that can share its pipeline call, in queue order, within the rules."""
    key, taken, images, adapters = batch_key(first), [first], first.images_requested, lora_sources([first])
    for job in queued:
        if job is first or batch_key(job) != key or images + job.images_requested > rules.max_images:
            continue
        if not rules.across_adapters and job.model != first.model:
            continue
        joined = adapters | lora_sources([job])
        if len(joined) > rules.max_adapters:
            continue
        taken.append(job)
        images, adapters = images + job.images_requested, joined
    return taken


def lora_sources(jobs: list[Job]) -> set[str]:
    """The LoRA files the jobs run with."""
    return {job.model.source for job in jobs if isinstance(job.model, LoraModel)}


def batch_items(batch: list[Job]) -> list[BatchItem]:
    """Each job's model, prompts, first seed and init image (and mask), as the engine takes them."""
    return [
        BatchItem(job.model, job.request.prompt, job.request.negative_prompt, job.seed, job.images_requested, image_source(job))
        for job in batch
    ]


def image_source(job: Job) -> ImageSource | None:
    """What an img2img or inpainting job starts from; None for txt2img."""
    image_input = job.request.image_input
    if image_input is None:
        return None
    return ImageSource(
        job.inputs["init"],
        job.inputs.get("mask"),
        image_input.mask_blur,
        image_input.inpaint_full_res,
        image_input.inpaint_full_res_padding,
    )


def images_in(batch: list[Job]) -> int:
    """Images the batch makes."""
    return sum(job.images_requested for job in batch)
