"""AUTOMATIC1111's API (/sdapi/v1) on this service, so that A1111 clients (Open WebUI, SillyTavern, IntraPaint's
sd-backend-client, webuiapi, plugins and bots) work unchanged: each txt2img and img2img call is a job in the same
queue, with the same keys (also in HTTP basic auth), tenant rules and limits; progress, interrupt and skip act on the
caller's own jobs. docs/a1111.md lists what is implemented, accepted and ignored, and refused."""

import asyncio
import base64
import hashlib
import json
import os
import time
from contextlib import suppress
from typing import Any

from fastapi import APIRouter, Body, Request
from pydantic import ValidationError

from schemas import (
    A1111ExtraSingleImageRequest,
    A1111ExtraSingleImageResponse,
    A1111ImagesResponse,
    A1111Img2ImgRequest,
    A1111Lora,
    A1111Model,
    A1111PngInfoRequest,
    A1111PngInfoResponse,
    A1111Progress,
    A1111ProgressState,
    A1111Sampler,
    A1111Scheduler,
    A1111Style,
    A1111Txt2ImgRequest,
    A1111Upscaler,
    GenerateRequest,
)
from sd_server import VERSION
from sd_server.api.dependencies import (
    CurrentUser,
    DecodingDep,
    EngineDep,
    JobsDep,
    RegistryDep,
    SettingsDep,
    StylesDep,
    services_of,
)
from sd_server.api.errors import body_validation_error, error_responses
from sd_server.api.routes.generation import GENERATION_ERRORS
from sd_server.api.submissions import ImageFiles, decode_image, off_the_loop, prepare_generation, run_job, share_of
from sd_server.domain.generation import (
    A1111_SAMPLERS,
    DEFAULT_HIRES_STRENGTH,
    HIRES_UPSCALERS,
    LATENT_UPSCALERS,
    MAX_SIDE,
    SchedulerName,
    karras_variant,
    sampler_label,
)
from sd_server.domain.jobs import Job, JobStatus
from sd_server.domain.models import DEFAULT_USER, LoraModel
from sd_server.engine.png import parse_parameters
from sd_server.errors import InvalidFieldError, InvalidPhotoError, JobFinishedError, UnknownUserError
from sd_server.jobs.submission import Jobs
from sd_server.jobs.workers import image_parameters, png_parameters
from sd_server.security.keys import Principal
from sd_server.storage.photos import image_size
from sd_server.storage.source_images import UPSCALERS, base64_payload, decode_base64, resized_png, text_chunks
from sd_server.styles import StyleBook

a1111_router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
# Our field -> A1111's, to name A1111's field in a validation error.
A1111_FIELDS = {
    "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images": "batch_size", "strength": "denoising_strength",
    "scheduler": "sampler_name", "init_image": "init_images", "mask_image": "mask", "hires": "hr_scale",
}  # fmt: skip
PROMPT_PLACEHOLDER = "-"  # A1111 allows an empty prompt, our request model does not: validated with this, then put back


def acting_user(principal: Principal) -> str:
    """Whom an A1111 call acts for: the key's user (the default user in open mode)."""
    return principal.acting_user(None, DEFAULT_USER)


# A1111's schedule types (GET /sdapi/v1/schedulers lists the ones that run as named): Karras runs a sampler's
# Karras variant; the others are accepted and run the sampler's own schedule.
KARRAS_SCHEDULE = "karras"
OWN_SCHEDULES = {"automatic", "uniform", "normal", "simple", "sgm_uniform", "exponential", "polyexponential", "kl_optimal", "align_your_steps", "beta", "ddim"}  # fmt: skip


def scheduler_for(body: A1111Txt2ImgRequest) -> SchedulerName | None:
    """Our scheduler for A1111's sampler name (or this API's own name) and schedule type; None: the model's own;
    422 naming the field if either is unknown."""
    schedule = (body.scheduler or "automatic").casefold().replace(" ", "_")
    if schedule != KARRAS_SCHEDULE and schedule not in OWN_SCHEDULES:
        raise InvalidFieldError(f"unknown schedule type '{body.scheduler}'; GET /sdapi/v1/schedulers lists them", field="scheduler")
    name = body.sampler_name or body.sampler_index
    if not name:
        return None
    known = {label.casefold(): scheduler for scheduler, label in A1111_SAMPLERS.items()} | {s.value: s for s in SchedulerName}
    if name.casefold() not in known:
        raise InvalidFieldError(f"unknown sampler '{name}'; GET /sdapi/v1/samplers lists them", field="sampler_name")
    sampler = known[name.casefold()]
    if schedule != KARRAS_SCHEDULE:
        return sampler
    karras = karras_variant(sampler)
    if karras is None:
        raise InvalidFieldError(f"sampler '{name}' has no Karras schedule here; use scheduler Automatic", field="scheduler")
    return karras


def hires_request(body: A1111Txt2ImgRequest) -> dict[str, Any]:
    """Our hires fix for A1111's enable_hr fields; 422 naming hr_upscaler for one the service does not have."""
    upscaler = body.hr_upscaler or "Latent"
    if upscaler not in HIRES_UPSCALERS:
        raise InvalidFieldError(f"unknown upscaler '{upscaler}'; one of {', '.join(HIRES_UPSCALERS)}", field="hr_upscaler")
    return {
        "scale": body.hr_scale, "width": body.hr_resize_x, "height": body.hr_resize_y, "upscaler": upscaler,
        "steps": body.hr_second_pass_steps, "denoising_strength": body.denoising_strength or DEFAULT_HIRES_STRENGTH,
    }  # fmt: skip


def generate_request(body: A1111Txt2ImgRequest) -> GenerateRequest:
    """Our request for an A1111 body; 422 naming A1111's field when a value is out of our ranges."""
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
    if body.enable_hr and not isinstance(body, A1111Img2ImgRequest):
        fields["hires"] = hires_request(body)
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

    return await run_job(generation, inputs, jobs, http_request, share_of(principal), cancelled_ends_it=True)


def images_response(job: Job, body: A1111Txt2ImgRequest, extra_images: list[str]) -> A1111ImagesResponse:
    """A1111's answer: the PNGs base64-encoded (none when the job was stopped before it made any), the request as
    received with A1111's defaults for what it left out (without its images), and `info`."""
    images = [base64.b64encode(png).decode("ascii") for png in job.take_pngs()] + extra_images
    parameters = A1111_PARAMETER_DEFAULTS | body.model_dump()
    if isinstance(body, A1111Img2ImgRequest):
        parameters |= {"init_images": None, "mask": None}  # as A1111 does: the images are not echoed back
    return A1111ImagesResponse(images=images, parameters=parameters, info=json.dumps(info(job)))


# What A1111 echoes in `parameters` for the fields this service accepts and ignores.
A1111_PARAMETER_DEFAULTS: dict[str, Any] = {
    "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "restore_faces": None,
    "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "s_min_uncond": None,
    "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "comments": None, "firstphase_width": 0, "firstphase_height": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None,
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}  # fmt: skip


def model_sha256(model_id: str) -> str:
    """What names a model as A1111's checkpoint SHA-256 does: here of its id, not of its file."""
    return hashlib.sha256(model_id.encode("utf-8")).hexdigest()


def model_hash(model_id: str) -> str:
    """A1111's short (10-hex-digit) checkpoint hash of a model."""
    return model_sha256(model_id)[:10]


def info(job: Job) -> dict[str, Any]:
    """The `info` A1111 sends with the images: what ran, with every image's seed and infotext, every field A1111
    writes (clients such as sd-backend-client validate them all)."""
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
        "face_restoration_model": None,
        "sd_model_name": job.model_id,
        "sd_model_hash": model_hash(job.model_id),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.image_input else (request.hires.strength if request.hires else 0),
        "extra_generation_params": {name: value for name, value in image_parameters(request).items() if name.startswith("Hires")},
        "index_of_first_image": 0,
        "infotexts": [png_parameters(job, scheduler, index) for index in range(count)],
        "styles": list(request.styles),
        "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"sd-server {VERSION}",
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


def current_jobs(jobs: Jobs, principal: Principal) -> tuple[list[Job], Job | None]:
    """The caller's active jobs, and the current one: running, else the next queued."""
    active = jobs.active_jobs(acting_user(principal))
    return active, next((job for job in active if job.status is JobStatus.running), active[0] if active else None)


@a1111_router.get("/progress")
async def progress(jobs: JobsDep, principal: CurrentUser, skip_current_image: bool = False) -> A1111Progress:
    """The caller's running job (else the next one queued): its share done, the seconds left at its pace, and the
    preview of its image at the last preview step (`current_image`, a base64 JPEG; SD_PREVIEW_EVERY)."""
    active, current = current_jobs(jobs, principal)
    if current is None:
        return A1111Progress(progress=0.0, eta_relative=0.0, state=A1111ProgressState(job_count=0, sampling_step=0, sampling_steps=0))
    step, total = current.step, max(current.total_steps, 1)
    elapsed = time.time() - current.started_at.timestamp() if current.started_at else 0.0
    eta = elapsed / step * (total - step) if step else 0.0
    stopping = current.finish_requested or current.cancel_requested
    state = A1111ProgressState(
        interrupted=stopping,
        stopping_generation=stopping,
        job=current.id,
        job_count=len(active),
        job_timestamp=current.created_at.strftime("%Y%m%d%H%M%S"),
        sampling_step=step,
        sampling_steps=total,
    )
    preview = None if skip_current_image else current.preview
    current_image = base64.b64encode(preview).decode("ascii") if preview else None
    textinfo = f"step {step} of {total}" if current.status is JobStatus.running else "queued"
    return A1111Progress(progress=round(step / total, 4), eta_relative=round(eta, 3), state=state, current_image=current_image, textinfo=textinfo)


async def stop_current(jobs: Jobs, principal: Principal, queued_too: bool) -> None:
    """Stop the caller's running jobs at their next step, keeping what they made (their calls answer 200 with it);
    with ``queued_too`` and nothing running, cancel the next queued one (its call answers 200 with no image)."""
    active, current = current_jobs(jobs, principal)
    running = [job for job in active if job.status is JobStatus.running]
    for job in running or ([current] if queued_too and current else []):
        with suppress(JobFinishedError):
            await asyncio.to_thread(jobs.cancel, job, True)


@a1111_router.post("/interrupt")
async def interrupt(jobs: JobsDep, principal: CurrentUser) -> None:
    """A1111's interrupt: the caller's current job stops at its next step and its call answers 200 with the images
    as the steps so far made them (a job still queued is cancelled, and its call answers no image). Jobs of the
    caller's other calls stay queued. A job sharing its batch with other users' jobs ends without an image."""
    await stop_current(jobs, principal, queued_too=True)


@a1111_router.post("/skip")
async def skip(jobs: JobsDep, principal: CurrentUser) -> None:
    """A1111's skip: the caller's running job stops at its next step with what it made (a whole job here: its images
    run in one batch, so there is no next one of them to go on with)."""
    await stop_current(jobs, principal, queued_too=False)


@a1111_router.get("/samplers")
async def samplers(principal: CurrentUser) -> list[A1111Sampler]:
    """The samplers, by A1111's names."""
    return [A1111Sampler(name=label, aliases=[scheduler.value]) for scheduler, label in A1111_SAMPLERS.items()]


@a1111_router.get("/schedulers")
async def schedulers(principal: CurrentUser) -> list[A1111Scheduler]:
    """The schedule types that run as named: Automatic (the sampler's own), Uniform (the same here) and Karras."""
    return [
        A1111Scheduler(name="automatic", label="Automatic"),
        A1111Scheduler(name="uniform", label="Uniform"),
        A1111Scheduler(name="karras", label="Karras", default_rho=7.0),
    ]


@a1111_router.get("/sd-models", responses=error_responses(UnknownUserError))
async def sd_models(registry: RegistryDep, principal: CurrentUser) -> list[A1111Model]:
    """The caller's model (an admin: every user's), as A1111 lists checkpoints."""
    models = registry.all().values() if principal.is_admin else [registry.serving(acting_user(principal))]
    distinct = {model.label: model for model in models}
    return [
        A1111Model(title=label, model_name=label, hash=model_hash(label), sha256=model_sha256(label), filename=model.source)
        for label, model in distinct.items()
    ]


@a1111_router.get("/loras")
async def loras(registry: RegistryDep, principal: CurrentUser) -> list[A1111Lora]:
    """The caller's own LoRA, when their model is one (an admin: every user's). It applies by itself: a prompt's
    ``<lora:...>`` tag is plain text here."""
    everyone, user = registry.all(), acting_user(principal)
    own = [everyone[user]] if user in everyone else []
    models = list(everyone.values()) if principal.is_admin else own
    adapters = {model.label: model for model in models if isinstance(model, LoraModel)}
    return [A1111Lora(name=label, alias=label, path=os.path.basename(model.source)) for label, model in adapters.items()]


@a1111_router.get("/options", responses=error_responses(UnknownUserError))
async def get_options(registry: RegistryDep, settings: SettingsDep, principal: CurrentUser) -> dict[str, Any]:
    """The options A1111 clients read: the checkpoint is the caller's model."""
    label = registry.serving(acting_user(principal)).label
    return {
        "sd_model_checkpoint": label,
        "sd_checkpoint_hash": model_sha256(label),
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "show_progress_every_n_steps": settings.preview_every,
        "live_previews_enable": bool(settings.preview_every),
    }


@a1111_router.post("/options")
async def set_options(principal: CurrentUser, options: dict[str, Any] = Body(default_factory=dict)) -> None:
    """Accepted and ignored: a user's model is set with PUT /users/{user_id}/model, not by sd_model_checkpoint."""


@a1111_router.get("/upscalers")
async def upscalers(principal: CurrentUser) -> list[A1111Upscaler]:
    """The upscalers this service has: plain resampling (Lanczos, Nearest), no upscaling model."""
    return [A1111Upscaler(name=name) for name in UPSCALERS]


@a1111_router.get("/latent-upscale-modes")
async def latent_upscale_modes(principal: CurrentUser) -> list[dict[str, str]]:
    """Hires fix's latent upscalers (hr_upscaler), which resize the first pass's latents."""
    return [{"name": name} for name in LATENT_UPSCALERS]


@a1111_router.get("/sd-vae")
async def sd_vae(principal: CurrentUser) -> list[dict[str, str]]:
    """None to choose: each model decodes with its own VAE ("Automatic")."""
    return []


@a1111_router.get("/hypernetworks")
async def hypernetworks(principal: CurrentUser) -> list[dict[str, str]]:
    """None: hypernetworks are not supported."""
    return []


@a1111_router.get("/embeddings")
async def embeddings(principal: CurrentUser) -> dict[str, dict[str, Any]]:
    """None: textual-inversion embeddings are not supported."""
    return {"loaded": {}, "skipped": {}}


@a1111_router.get("/sd-modules")
async def sd_modules(principal: CurrentUser) -> list[dict[str, str]]:
    """None (Forge's extra text encoders and VAEs): each model runs with its own modules."""
    return []


@a1111_router.get("/cmd-flags")
async def cmd_flags(settings: SettingsDep, principal: CurrentUser) -> dict[str, Any]:
    """The command-line flags A1111 clients read, as this service stands."""
    return {"api": True, "nowebui": False, "listen": True, "api_auth": None, "no_half": settings.dtype == "float32", "medvram": False, "lowvram": False}


def ram() -> dict[str, Any]:
    """The machine's RAM, free, used and in all (bytes), as A1111 reports it; an error where the system does not say."""
    try:
        page, pages, free_pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # SC_AVPHYS_PAGES is Linux's
        return {"error": "this system does not report its free memory"}
    return {"free": float(page * free_pages), "used": float(page * (pages - free_pages)), "total": float(page * pages)}


@a1111_router.get("/memory")
async def memory(engine: EngineDep, principal: CurrentUser) -> dict[str, Any]:
    """RAM and device memory in A1111's shape (bytes)."""
    report = await asyncio.to_thread(engine.report)
    if report["device"].startswith("cuda"):
        used = float(report["device_memory_bytes"])
        return {"ram": ram(), "cuda": {"system": {"used": used}, "active": {"current": used}}}
    return {"ram": ram(), "cuda": {"error": f"no CUDA device: the model runs on {report['device']}"}}


@a1111_router.post("/refresh-checkpoints")
async def refresh_checkpoints(principal: CurrentUser) -> None:
    """Nothing to rescan: models are registered with PUT /users/{user_id}/model and read when first used."""


@a1111_router.post("/refresh-loras")
async def refresh_loras(principal: CurrentUser) -> None:
    """Nothing to rescan: LoRAs are uploaded or trained through the API."""


@a1111_router.post("/refresh-vae")
async def refresh_vae(principal: CurrentUser) -> None:
    """Nothing to rescan: each model decodes with its own VAE."""


@a1111_router.post("/png-info")
async def png_info(body: A1111PngInfoRequest, decoding: DecodingDep, principal: CurrentUser) -> A1111PngInfoResponse:
    """The generation parameters a picture carries (the PNG ``parameters`` text this service and A1111 write), parsed
    as A1111 parses them; empty for a picture without them."""
    items = await decoding.run(lambda: text_chunks(decode_base64("image", body.image), "image"))
    text = items.get("parameters", "")
    return A1111PngInfoResponse(info=text, items=items, parameters=parse_parameters(text) if text else {})


@a1111_router.post("/extra-single-image")
async def extra_single_image(body: A1111ExtraSingleImageRequest, decoding: DecodingDep, principal: CurrentUser) -> A1111ExtraSingleImageResponse:
    """A1111's extras: the picture resized by ``upscaling_resize`` (or to ``upscaling_resize_w`` x ``_h``) with
    ``upscaler_1`` (GET /sdapi/v1/upscalers), at most MAX_SIDE a side, checked before the picture is decoded."""
    if body.upscaler_1 not in UPSCALERS:
        raise InvalidFieldError(f"unknown upscaler '{body.upscaler_1}'; GET /sdapi/v1/upscalers lists them", field="upscaler_1")

    def resize() -> bytes:
        data = decode_base64("image", body.image)
        width, height = image_size("image", data, field="image")
        size = (body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode else (round(width * body.upscaling_resize), round(height * body.upscaling_resize))
        if max(size) > MAX_SIDE or min(size) < 1:
            field = "upscaling_resize_w" if body.resize_mode else "upscaling_resize"
            raise InvalidPhotoError(f"{field}: {width}x{height} resized to {size[0]}x{size[1]} is outside 1..{MAX_SIDE} a side", field=field)
        return resized_png(data, "image", size, body.upscaler_1)

    png = await decoding.run(resize)
    return A1111ExtraSingleImageResponse(html_info="", image=base64.b64encode(png).decode("ascii"))


@a1111_router.get("/prompt-styles")
async def prompt_styles(styles: StylesDep, principal: CurrentUser) -> list[A1111Style]:
    """The style presets (GET /styles), as A1111 lists them."""
    return [A1111Style(name=style.name, prompt=style.prompt, negative_prompt=style.negative_prompt) for style in await asyncio.to_thread(styles.all)]


@a1111_router.get("/scripts")
async def scripts(principal: CurrentUser) -> dict[str, list[str]]:
    """No scripts here (clients probe this for extensions)."""
    return {"txt2img": [], "img2img": []}


a1111_internal_router = APIRouter(prefix="/internal", tags=["a1111"])


@a1111_internal_router.get("/ping")
async def ping() -> dict[str, Any]:
    """A1111's liveness ping, open as A1111's is: clients call it before anything else (/health says more)."""
    return {}
