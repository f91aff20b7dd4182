"""AUTOMATIC1111's API (/sdapi/v1) on this service, so that A1111 clients (plugins, bots, scripts) work unchanged:
each txt2img and img2img call is a job in the same queue, with the same keys (also as HTTP basic auth's password),
tenant rules and limits; progress and interrupt act on the caller's own jobs."""

import asyncio
import base64
import json
import time
from contextlib import suppress
from typing import Any

from fastapi import APIRouter, Body, Request
from pydantic import ValidationError

from schemas import (
    A1111ImagesResponse,
    A1111Img2ImgRequest,
    A1111Model,
    A1111Progress,
    A1111ProgressState,
    A1111Sampler,
    A1111Style,
    A1111Txt2ImgRequest,
    GenerateRequest,
)
from sd_server.api.dependencies import CurrentUser, JobsDep, RegistryDep, StylesDep, services_of
from sd_server.api.errors import body_validation_error, error_responses
from sd_server.api.routes.generation import GENERATION_ERRORS
from sd_server.api.submissions import ImageFiles, decode_image, off_the_loop, prepare_generation, run_job, share_of
from sd_server.domain.generation import A1111_SAMPLERS, SchedulerName, sampler_label
from sd_server.domain.jobs import Job, JobStatus
from sd_server.domain.models import DEFAULT_USER
from sd_server.errors import InvalidFieldError, JobFinishedError, UnknownUserError
from sd_server.jobs.submission import Jobs
from sd_server.jobs.workers import png_parameters
from sd_server.security.keys import Principal
from sd_server.storage.source_images import base64_payload
from sd_server.styles import StyleBook

a1111_router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
# Our field -> A1111's, to name A1111's field in a validation error.
A1111_FIELDS = {
    "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images": "batch_size", "strength": "denoising_strength",
    "scheduler": "sampler_name", "init_image": "init_images", "mask_image": "mask",
}  # fmt: skip
PROMPT_PLACEHOLDER = "-"  # A1111 allows an empty prompt, our request model does not: validated with this, then put back


def acting_user(principal: Principal) -> str:
    """Whom an A1111 call acts for: the key's user (the default user in open mode)."""
    return principal.acting_user(None, DEFAULT_USER)


def scheduler_for(body: A1111Txt2ImgRequest) -> SchedulerName | None:
    """Our scheduler for A1111's sampler name (or this API's own name); None: the model's own; 422 if unknown."""
    name = body.sampler_name or body.sampler_index
    if not name:
        return None
    if name == "DPM++ 2M" and (body.scheduler or "").casefold() == "karras":
        return SchedulerName.dpmpp_2m_karras
    known = {label.casefold(): scheduler for scheduler, label in A1111_SAMPLERS.items()} | {s.value: s for s in SchedulerName}
    if name.casefold() not in known:
        raise InvalidFieldError(f"unknown sampler '{name}'; GET /sdapi/v1/samplers lists them", field="sampler_name")
    return known[name.casefold()]


def generate_request(body: A1111Txt2ImgRequest) -> GenerateRequest:
    """Our request for an A1111 body; 422 naming A1111's field when a value is out of our ranges."""
    if body.enable_hr:
        raise InvalidFieldError("hires fix (enable_hr) is not supported; generate, then send the image to img2img", field="enable_hr")
    fields: dict[str, Any] = {
        "prompt": body.prompt.strip() or PROMPT_PLACEHOLDER,
        "negative_prompt": body.negative_prompt or None,
        "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": None if body.seed == -1 else body.seed,
        "num_images": body.batch_size * body.n_iter,
        "scheduler": scheduler_for(body),
        "styles": body.styles or [],
    }
    if isinstance(body, A1111Img2ImgRequest):
        fields |= {
            "strength": body.denoising_strength,
            "mask_blur": body.mask_blur,
            "inpaint_full_res": body.inpaint_full_res,
            "inpaint_full_res_padding": body.inpaint_full_res_padding,
        }
    try:
        request = GenerateRequest.model_validate(fields)
    except ValidationError as error:
        raise body_validation_error(error, A1111_FIELDS) from error
    return request.model_copy(update={"prompt": body.prompt})


async def generate(
    body: A1111Txt2ImgRequest, files: ImageFiles, principal: Principal, jobs: Jobs, styles: StyleBook, http_request: Request
) -> Job:
    """Run an A1111 call as a synchronous job in our queue."""
    request = generate_request(body)
    user_id, decodes = acting_user(principal), files.init_image is not None
    try:
        generation, inputs = await off_the_loop(lambda: prepare_generation(request, user_id, styles, files), decodes, services_of(http_request).decoding)
    except InvalidFieldError as error:  # named as A1111 names the field
        error.location = tuple(A1111_FIELDS.get(part, part) for part in error.location)
        raise

    return await run_job(generation, inputs, jobs, http_request, share_of(principal))


def images_response(job: Job, body: A1111Txt2ImgRequest, extra_images: list[str]) -> A1111ImagesResponse:
    """A1111's answer: the PNGs base64-encoded, the request as received (without its images), and `info`."""
    images = [base64.b64encode(png).decode("ascii") for png in job.take_pngs()] + extra_images
    parameters = body.model_dump()
    if isinstance(body, A1111Img2ImgRequest):
        parameters |= {"init_images": None, "mask": None}  # as A1111 does: the images are not echoed back
    return A1111ImagesResponse(images=images, parameters=parameters, info=json.dumps(info(job)))


def info(job: Job) -> dict[str, Any]:
    """The `info` A1111 sends with the images: what ran, with every image's seed and infotext."""
    request, count = job.request, job.images_requested
    scheduler = job.scheduler_used or ""
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt or "",
        "all_negative_prompts": [request.negative_prompt or ""] * count,
        "seed": job.seed,
        "all_seeds": [job.seed + index for index in range(count)],
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler_label(scheduler),
        "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps,
        "batch_size": count,
        "restore_faces": False,
        "sd_model_name": job.model_id,
        "sd_model_hash": None,
        "denoising_strength": request.strength if request.image_input else 0,
        "styles": list(request.styles),
        "infotexts": [png_parameters(job, scheduler, index) for index in range(count)],
        "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "index_of_first_image": 0,
        "extra_generation_params": {},
    }


@a1111_router.post("/txt2img", responses=GENERATION_ERRORS)
async def txt2img(body: A1111Txt2ImgRequest, jobs: JobsDep, principal: CurrentUser, styles: StylesDep, http_request: Request) -> A1111ImagesResponse:
    """A1111's txt2img: the images as base64 PNGs, the request, and `info` (a JSON string with the seeds)."""
    job = await generate(body, ImageFiles(), principal, jobs, styles, http_request)
    return images_response(job, body, [])


@a1111_router.post("/img2img", responses=GENERATION_ERRORS)
async def img2img(body: A1111Img2ImgRequest, jobs: JobsDep, principal: CurrentUser, styles: StylesDep, http_request: Request) -> A1111ImagesResponse:
    """A1111's img2img, and inpainting with `mask` (white repaints; `inpainting_mask_invert: 1` flips it)."""
    files = await services_of(http_request).decoding.run(
        lambda: ImageFiles(decode_image("init_images", body.init_images[0]), decode_image("mask", body.mask), bool(body.inpainting_mask_invert))
    )
    job = await generate(body, files, principal, jobs, styles, http_request)
    return images_response(job, body, [base64_payload(body.init_images[0])] if body.include_init_images else [])


@a1111_router.get("/progress")
async def progress(jobs: JobsDep, principal: CurrentUser) -> A1111Progress:
    """The caller's running job (else the next one queued): its share done, the seconds left at its pace, and the
    preview of its image at the last preview step (`current_image`, a base64 JPEG; SD_PREVIEW_EVERY)."""
    active = jobs.active_jobs(acting_user(principal))
    current = next((job for job in active if job.status is JobStatus.running), active[0] if active else None)
    if current is None:
        return A1111Progress(progress=0.0, eta_relative=0.0, state=A1111ProgressState(job_count=0, sampling_step=0, sampling_steps=0))
    step, total = current.step, max(current.total_steps, 1)
    elapsed = time.time() - current.started_at.timestamp() if current.started_at else 0.0
    eta = elapsed / step * (total - step) if step else 0.0
    state = A1111ProgressState(job=current.id, job_count=len(active), job_timestamp=current.created_at.strftime("%Y%m%d%H%M%S"), sampling_step=step, sampling_steps=total)
    preview = current.preview
    current_image = base64.b64encode(preview).decode("ascii") if preview else None
    return A1111Progress(progress=round(step / total, 4), eta_relative=round(eta, 3), state=state, current_image=current_image)


@a1111_router.post("/interrupt")
async def interrupt(jobs: JobsDep, principal: CurrentUser) -> None:
    """Cancel the caller's queued and running jobs (a running one stops at its next step; its call answers 409)."""
    for job in jobs.active_jobs(acting_user(principal)):
        with suppress(JobFinishedError):
            await asyncio.to_thread(jobs.cancel, job)


@a1111_router.get("/samplers")
async def samplers(principal: CurrentUser) -> list[A1111Sampler]:
    """The samplers, by A1111's names."""
    return [A1111Sampler(name=label, aliases=[scheduler.value]) for scheduler, label in A1111_SAMPLERS.items()]


@a1111_router.get("/sd-models", responses=error_responses(UnknownUserError))
async def sd_models(registry: RegistryDep, principal: CurrentUser) -> list[A1111Model]:
    """The caller's model (an admin: every user's), as A1111 lists checkpoints."""
    models = registry.all().values() if principal.is_admin else [registry.get(acting_user(principal))]
    distinct = {model.label: model for model in models}
    return [A1111Model(title=label, model_name=label, filename=model.source) for label, model in distinct.items()]


@a1111_router.get("/options", responses=error_responses(UnknownUserError))
async def get_options(registry: RegistryDep, principal: CurrentUser) -> dict[str, Any]:
    """The options A1111 clients read: the checkpoint is the caller's model."""
    model = registry.get(acting_user(principal))
    return {"sd_model_checkpoint": model.label, "sd_checkpoint_hash": None, "samples_format": "png", "CLIP_stop_at_last_layers": 1}


@a1111_router.post("/options")
async def set_options(principal: CurrentUser, options: dict[str, Any] = Body(default_factory=dict)) -> None:
    """Accepted and ignored: a user's model is set with PUT /users/{user_id}/model, not by sd_model_checkpoint."""


@a1111_router.get("/prompt-styles")
async def prompt_styles(styles: StylesDep, principal: CurrentUser) -> list[A1111Style]:
    """The style presets (GET /styles), as A1111 lists them."""
    return [A1111Style(name=style.name, prompt=style.prompt, negative_prompt=style.negative_prompt) for style in await asyncio.to_thread(styles.all)]


@a1111_router.get("/scripts")
async def scripts(principal: CurrentUser) -> dict[str, list[str]]:
    """No scripts here (clients probe this for extensions)."""
    return {"txt2img": [], "img2img": []}
