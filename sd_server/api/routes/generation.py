"""POST /generate and POST /generate/image: a job submitted and waited for, answered with its images. Both take
text-to-image, img2img (init_image) and inpainting (init_image and mask_image) requests; /generate/image also takes
the images as multipart files."""

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from schemas import GenerateRequest, GenerateResponse
from sd_server.api.dependencies import CurrentUser, JobsDep, StorageDep, StylesDep, services_of
from sd_server.api.errors import body_validation_error, error_responses
from sd_server.api.presenters import generate_response
from sd_server.api.submissions import run_job, share_of, submission
from sd_server.domain.jobs import Job
from sd_server.errors import (
    ConflictError,
    DeviceOutOfMemoryError,
    ForbiddenError,
    GenerationFailedError,
    JobTimeoutError,
    UnknownUserError,
)
from sd_server.jobs.submission import Jobs
from sd_server.security.keys import Principal
from sd_server.styles import StyleBook

generation_router = APIRouter(tags=["generation"])
GENERATION_ERRORS = error_responses(
    ForbiddenError, UnknownUserError, ConflictError, GenerationFailedError, DeviceOutOfMemoryError, JobTimeoutError
)
IMAGE_INPUT_PATHS = re.compile(r"/generate(/image)?|/jobs|/provenance/verify|/sdapi/v1/(txt2img|img2img|png-info|extra-single-image)")  # bodies up to SD_MAX_IMAGE_BODY_BYTES
IMAGE_FILES = ("init_image", "mask_image")
VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


async def generate_for(
    request: GenerateRequest,
    principal: Principal,
    jobs: Jobs,
    styles: StyleBook,
    http_request: Request,
    uploads: dict[str, bytes] | None = None,
) -> Job:
    """Prepare the generation ``request`` asks for, run it, wait for it."""
    generation, inputs = await submission(request, principal, styles, services_of(http_request).decoding, uploads)
    return await run_job(generation, inputs, jobs, http_request, share_of(principal))


@generation_router.post("/generate", responses=GENERATION_ERRORS)
async def generate(
    request: GenerateRequest, jobs: JobsDep, storage: StorageDep, principal: CurrentUser, styles: StylesDep, http_request: Request
) -> GenerateResponse:
    """Generate images with the user's model (from the prompt, or from `init_image` and `mask_image`); they come
    back as base64 PNGs with their seeds."""
    job = await generate_for(request, principal, jobs, styles, http_request)
    return generate_response(job, storage)


def generate_image_body() -> dict[str, Any]:
    """The OpenAPI request body of /generate/image: GenerateRequest as JSON, or as a form with image files."""
    form = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    form.pop("examples", None)
    for name in IMAGE_FILES:
        form["properties"][name] = {"type": "string", "format": "binary", "description": form["properties"][name]["description"]}
    json_body = {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}
    return {"requestBody": {"required": True, "content": {"application/json": json_body, "multipart/form-data": {"schema": form}}}}


@generation_router.post(
    "/generate/image",
    response_class=Response,
    openapi_extra=generate_image_body(),
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG, seed and model in headers."},
        422: VALIDATION_ERROR,  # the body is read by the route (JSON or a form), so FastAPI does not add it
        **GENERATION_ERRORS,
    },
)
async def generate_image(http_request: Request, jobs: JobsDep, principal: CurrentUser, styles: StylesDep) -> Response:
    """Generate one image and answer with the PNG itself (headers X-Seed, X-Model-Id, X-Generation-Time). The body is
    GenerateRequest as JSON, or the same fields as a multipart form with `init_image` and `mask_image` as files."""
    request, uploads = await image_request(http_request)
    if request.num_images != 1:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "num_images"), "msg": "must be 1 for /generate/image; use /generate for more", "input": request.num_images}]
        )
    job = await generate_for(request, principal, jobs, styles, http_request, uploads)
    headers = {"X-Seed": str(job.seed), "X-Model-Id": job.model_id, "X-Generation-Time": f"{job.generation_seconds:.3f}"}
    return Response(content=job.take_pngs()[0], media_type="image/png", headers=headers)


async def image_request(http_request: Request) -> tuple[GenerateRequest, dict[str, bytes]]:
    """The request of a JSON body, or of a multipart form and its (non-empty) image files; 422 as FastAPI words it."""
    try:
        if not http_request.headers.get("content-type", "").startswith("multipart/form-data"):
            return GenerateRequest.model_validate_json(await http_request.body()), {}
        form = await http_request.form()
        fields: dict[str, Any] = {name: value for name, value in form.items() if isinstance(value, str) and name != "styles"}
        if styles := form.getlist("styles"):
            fields["styles"] = styles
        files = {name: await value.read() for name, value in form.items() if isinstance(value, UploadFile) and name in IMAGE_FILES}
        uploads = {name: data for name, data in files.items() if data}
        return GenerateRequest.model_validate({**fields, **{name: "(file)" for name in uploads}}), uploads
    except ValidationError as error:
        raise body_validation_error(error) from error
