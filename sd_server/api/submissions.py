"""From a request to a queued generation: who it acts for, its styles applied, its init image and mask decoded and
sized, its steps checked; then submitted and (for the synchronous routes) waited for."""

import asyncio
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import TypeVar

from fastapi import Request

from schemas import GenerateRequest, HiresRequest
from sd_server.api.work_pools import WorkPool
from sd_server.domain.generation import Generation, Hires, ImageInput
from sd_server.domain.jobs import Job, JobStatus, Priority
from sd_server.domain.models import DEFAULT_USER
from sd_server.domain.prompt_weights import check_weights
from sd_server.errors import ClientDisconnectedError, ConflictError, InvalidFieldError, JobFailedError, JobFinishedError
from sd_server.jobs.admission import Share
from sd_server.jobs.submission import Jobs
from sd_server.observability.logging import request_id_var
from sd_server.provenance.credentials import has_credentials
from sd_server.security.keys import Principal
from sd_server.security.webhook_urls import check_webhook_url
from sd_server.storage.source_images import decode_base64, prepare_sources
from sd_server.styles import StyleBook

T = TypeVar("T")


@dataclass(frozen=True)
class ImageFiles:
    """The init image and mask bytes a request carries (base64 fields decoded, or multipart files)."""

    init_image: bytes | None = None
    mask_image: bytes | None = None
    invert_mask: bool = False  # A1111's inpainting_mask_invert

    @classmethod
    def from_request(cls, request: GenerateRequest, uploads: dict[str, bytes]) -> "ImageFiles":
        """The images of a request: uploaded files by field name, else its base64 fields decoded."""
        init, mask = (uploads.get(name) or decode_image(name, getattr(request, name)) for name in ("init_image", "mask_image"))
        return cls(init, mask)


def decode_image(field: str, value: str | None) -> bytes | None:
    """A base64 image field's bytes, None when it is not set."""
    return decode_base64(field, value) if value else None


def prepare_generation(request: GenerateRequest, user_id: str, styles: StyleBook, files: ImageFiles) -> tuple[Generation, dict[str, bytes]]:
    """The generation ``request`` asks for on behalf of ``user_id``, and its init image and mask PNGs by name; 422
    for an unknown style, an image that does not decode, a mask without an init image, or a strength that runs no
    step. Blocking (decodes images): call it off the event loop."""
    if files.mask_image is not None and files.init_image is None:
        raise InvalidFieldError("mask_image needs init_image, the picture to inpaint", field="mask_image")
    prompt, negative_prompt = styles.apply(request.styles, request.prompt, request.negative_prompt)
    check_prompt_weights(prompt, negative_prompt, bool(request.styles))
    generation = replace(request.to_generation(user_id), prompt=prompt, negative_prompt=negative_prompt, styles=tuple(request.styles))
    if request.hires is not None:
        generation = replace(generation, hires=hires_of(request.hires, generation, files))
    if files.init_image is None:
        return generation, {}
    size = (request.width, request.height) if {"width", "height"} & request.model_fields_set else None
    sources = prepare_sources(files.init_image, files.mask_image, size, files.invert_mask)
    credentials = files.init_image if has_credentials(files.init_image) else None
    image_input = ImageInput(
        sources.init_sha256,
        request.strength,
        sources.mask_sha256,
        request.mask_blur,
        request.inpaint_full_res,
        request.inpaint_full_res_padding,
        init_credentials=credentials is not None,
    )
    generation = replace(generation, width=sources.width, height=sources.height, image_input=image_input)
    if generation.steps_to_run < 1:
        raise InvalidFieldError(
            f"int(num_inference_steps x strength) = int({request.num_inference_steps} x {request.strength}) runs no step; "
            "raise strength or num_inference_steps",
            field="strength",
        )
    inputs = {"init": sources.init_png, **({"mask": sources.mask_png} if sources.mask_png else {})}
    return generation, inputs | ({"credentials": credentials} if credentials else {})


def hires_of(hires: HiresRequest, generation: Generation, files: ImageFiles) -> Hires:
    """The hires fix a text-to-image request asks for; 422 naming ``hires`` with an init image, or when its size is
    out of range."""
    if files.init_image is not None:
        raise InvalidFieldError("hires fix runs after a text-to-image pass; leave it out with an init image", field="hires")
    try:
        return hires.to_hires(generation.width, generation.height)
    except ValueError as error:
        raise InvalidFieldError(str(error), field="hires") from error


def check_prompt_weights(prompt: str, negative_prompt: str | None, styled: bool) -> None:
    """422 naming the prompt whose attention weights are out of range or nest too deep (``styled``: the message says
    the styles are applied)."""
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
        try:
            check_weights(text)
        except ValueError as error:
            where = f"{field} (with its styles applied)" if styled else field
            raise InvalidFieldError(f"{where}: {error}", field=field) from error


async def submission(
    request: GenerateRequest, principal: Principal, styles: StyleBook, decoding: WorkPool, uploads: dict[str, bytes] | None = None
) -> tuple[Generation, dict[str, bytes]]:
    """The generation a request to /generate, /generate/image or /jobs asks for, on behalf of whom it acts for, and
    its image inputs (``uploads``: multipart files by field), prepared off the event loop: on the decoding pool when
    it carries images, so a text-to-image request never waits behind other users' decoding."""
    requested = request.user_id if "user_id" in request.model_fields_set else None
    user_id = principal.acting_user(requested, DEFAULT_USER)
    images = bool(request.init_image or request.mask_image or uploads)
    return await off_the_loop(lambda: prepare_generation(request, user_id, styles, ImageFiles.from_request(request, uploads or {})), images, decoding)


async def off_the_loop(work: Callable[[], T], decodes_images: bool, decoding: WorkPool) -> T:
    """``work()`` on the decoding pool when it decodes images, else on the default executor: a text-to-image request
    never waits behind other users' decoding."""
    return await (decoding.run(work) if decodes_images else asyncio.to_thread(work))


async def checked_webhook(url: object | None, lookups: WorkPool, allow_private: bool) -> str | None:
    """The webhook URL as text, once its host resolves to public addresses only (SD_WEBHOOK_ALLOW_PRIVATE aside),
    looked up on a pool of its own: a slow DNS answer holds up no other request."""
    if url is None:
        return None
    await lookups.run(check_webhook_url, str(url), allow_private)
    return str(url)


def share_of(principal: Principal, requested: Priority | None = None) -> Share:
    """What the key gives a job: its priority class (a request may lower it to batch, never raise it), its weight,
    its owner as the tenant (open access: the job's user), and the key (its secret signs the webhooks)."""
    batch = Priority.batch in (principal.priority, requested)
    return Share(Priority.batch if batch else Priority.interactive, principal.weight, principal.user_id, principal.key_id)


async def run_job(
    generation: Generation, inputs: dict[str, bytes], jobs: Jobs, http_request: Request, share: Share, cancelled_ends_it: bool = False
) -> Job:
    """Queue ``generation`` as a synchronous job and wait for it; a client that disconnects cancels it. A cancelled
    job answers 409, unless ``cancelled_ends_it`` (A1111's calls answer what was made, maybe nothing)."""
    # The database write runs off the event loop (asyncio.to_thread copies the request-id context along).
    job, _ = await asyncio.to_thread(
        jobs.submit, generation, synchronous=True, request_id=request_id_var.get(), inputs=inputs, share=share
    )
    while not job.finished.is_set():
        with suppress(TimeoutError):
            async with asyncio.timeout(0.25):
                await job.finished.wait()
        if not job.finished.is_set() and await http_request.is_disconnected():
            with suppress(JobFinishedError):
                await asyncio.to_thread(jobs.cancel, job)
            raise ClientDisconnectedError(f"job {job.id} cancelled: its client left")
    if job.status is JobStatus.failed:
        raise JobFailedError(job.error or "the job failed", job.error_status or 500)
    if job.status is JobStatus.cancelled and not cancelled_ends_it:
        raise ConflictError(f"job {job.id} was cancelled before it finished")
    return job
