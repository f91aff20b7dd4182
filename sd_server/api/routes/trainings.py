"""The trainings API: train a user's LoRA from their photos, then list, read, follow (Server-Sent Events), cancel and
delete trainings, and fetch their sample images."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from schemas import TrainingCreated, TrainingForm, TrainingList, TrainingResponse
from sd_server.api.dependencies import CurrentUser, TrainingDep, TrainingsDep, VisibleUser
from sd_server.api.errors import error_responses
from sd_server.api.presenters import training_links, training_response
from sd_server.api.routes.images import stored_image
from sd_server.api.sse import event_response, follow
from sd_server.domain.trainings import TrainingSettings
from sd_server.errors import (
    ConflictError,
    InvalidFieldError,
    InvalidPhotoError,
    NotFoundError,
    TrainingLimitError,
    UnknownUserError,
)
from sd_server.observability.logging import request_id_var
from sd_server.security.webhook_urls import check_webhook_url
from sd_server.storage.photos import MAX_PHOTOS, Photo, photos_in_archive, prepare_photos

trainings_router = APIRouter(tags=["trainings"])
TRAINING_ERRORS = error_responses(NotFoundError, ConflictError)
TRAINING_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": f"3 to {MAX_PHOTOS} photos of the subject (JPEG, PNG, WebP...); or send `archive`.",
                    },
                    "archive": {"type": "string", "format": "binary", "description": "A zip of the photos, instead of `images`."},
                    **TrainingForm.model_json_schema()["properties"],
                },
            }
        }
    },
}


async def read_photos(request: Request) -> tuple[list[Photo], TrainingForm]:
    """The multipart body, read only now (after the key and the size were checked): the photos (from `images` or a
    zip in `archive`) and the fields; 422 naming the field that is missing or invalid."""
    form = await request.form(max_files=MAX_PHOTOS + 1, max_fields=len(TrainingForm.model_fields) + 1)
    try:
        fields = {name: value for name, value in form.items() if name not in ("images", "archive")}
        try:
            settings = TrainingForm.model_validate(fields)
        except ValidationError as error:
            raise RequestValidationError([{**detail, "loc": ("body", *detail["loc"])} for detail in error.errors()]) from error
        return await uploaded_photos(form, request.app.state.settings.max_upload_bytes), settings
    finally:
        await form.close()


async def uploaded_photos(form: FormData, max_bytes: int) -> list[Photo]:
    """The photos of the form: each file of `images`, or the image files inside the zip in `archive`."""
    images = [upload for upload in form.getlist("images") if isinstance(upload, UploadFile)]
    archive = form.get("archive")
    if images and isinstance(archive, UploadFile):
        raise InvalidPhotoError("send the photos as `images` or as one zip in `archive`, not both")
    if isinstance(archive, UploadFile):
        return await asyncio.to_thread(photos_in_archive, await archive.read(), max_bytes)
    if not images:
        raise InvalidPhotoError("no photos: send 3 or more files in the repeated field `images`, or a zip in `archive`")
    return [Photo(upload.filename or f"images[{index}]", await upload.read()) for index, upload in enumerate(images)]


def training_settings(form: TrainingForm, max_steps: int) -> TrainingSettings:
    """What the training runs with; 422 for more steps than SD_MAX_TRAINING_STEPS."""
    if form.steps > max_steps:
        raise InvalidFieldError(f"steps: at most {max_steps} (SD_MAX_TRAINING_STEPS)", field="steps")
    return TrainingSettings(**form.model_dump(exclude={"webhook_url"}))


@trainings_router.post(
    "/users/{user_id}/trainings",
    status_code=202,
    responses=error_responses(NotFoundError, UnknownUserError, ConflictError, TrainingLimitError),
    openapi_extra={"requestBody": TRAINING_UPLOAD_BODY},
)
async def create_training(
    user_id: VisibleUser,
    request: Request,
    trainings: TrainingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="Retrying with the same key returns the same training.")] = None,
) -> TrainingCreated:
    """Train a LoRA of the user's subject from their photos (multipart: `images` repeated, or a zip in `archive`,
    and the settings as form fields). Answers at once; follow it at `links.self` or `links.events`. On success the
    LoRA becomes the user's model (unless `activate=false`). A user's own key may train their own model."""
    photos, form = await read_photos(request)
    settings = training_settings(form, trainings.settings.max_training_steps)
    webhook_url = str(form.webhook_url) if form.webhook_url else None
    if webhook_url:
        await asyncio.to_thread(check_webhook_url, webhook_url, trainings.settings.webhook_allow_private)
    prepared = await asyncio.to_thread(prepare_photos, photos, settings.resolution, trainings.settings.training_min_photo_side)
    training, _ = await asyncio.to_thread(
        trainings.submit, user_id, settings, prepared, webhook_url, idempotency_key, request_id_var.get()
    )
    response.headers["Location"] = f"/trainings/{training.id}"
    return TrainingCreated(training_id=training.id, status=training.status, photos=training.photo_count, links=training_links(training))


@trainings_router.get("/trainings")
async def list_trainings(
    trainings: TrainingsDep,
    principal: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    user_id: Annotated[str | None, Query(description="Only this user's trainings (admins).")] = None,
) -> TrainingList:
    """Trainings newest first; a user key sees its own only."""
    if not principal.is_admin:
        user_id = principal.user_id
    page, total = await asyncio.to_thread(trainings.store.page, user_id, limit, offset)
    shown = [trainings.live(training.id) or training for training in page]  # live progress for active ones
    return TrainingList(trainings=[training_response(training) for training in shown], total=total, limit=limit, offset=offset)


@trainings_router.get("/trainings/{training_id}", responses=error_responses(NotFoundError))
async def get_training(training: TrainingDep) -> TrainingResponse:
    """The training's status, progress, settings, samples, and the model it produced (or its error)."""
    return training_response(training)


@trainings_router.get(
    "/trainings/{training_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "queued, preparing, training, progress..., then succeeded, failed or cancelled."},
        **error_responses(NotFoundError),
    },
)
async def training_events(training: TrainingDep, trainings: TrainingsDep) -> StreamingResponse:
    """Server-Sent Events: the current state first, then each change; the stream ends with the training."""
    present = lambda: training_response(training).model_dump(mode="json")  # noqa: E731
    return event_response(follow(trainings.events, training, lambda: training.status.value, present))


@trainings_router.post("/trainings/{training_id}/cancel", responses=TRAINING_ERRORS)
async def cancel_training(training: TrainingDep, trainings: TrainingsDep) -> TrainingResponse:
    """Cancel: a queued training ends now, a running one after its current slice of steps. 409 once ended."""
    await asyncio.to_thread(trainings.cancel, training)
    return training_response(training)


@trainings_router.delete("/trainings/{training_id}", status_code=204, responses=error_responses(NotFoundError))
async def delete_training(training: TrainingDep, trainings: TrainingsDep) -> Response:
    """Cancel the training if it is active, then delete it, its photos and its samples (its LoRA stays)."""
    await asyncio.to_thread(trainings.delete, training)
    return Response(status_code=204)


@trainings_router.get(
    "/trainings/{training_id}/samples/{index}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The sample PNG (local storage)."},
        307: {"description": "Redirect to a presigned URL (S3 storage)."},
        **error_responses(NotFoundError),
    },
)
async def get_sample(training: TrainingDep, trainings: TrainingsDep, index: Annotated[int, Path(ge=0, le=99)]) -> Response:
    """A sample image drawn with the trained LoRA."""
    if index >= len(training.samples):
        raise NotFoundError(f"training {training.id} has {len(training.samples)} samples")
    return stored_image(trainings.storage, training.samples[index])
