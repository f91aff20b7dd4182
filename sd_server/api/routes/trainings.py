"""The trainings API: train a user's LoRA from their photos, then list, read, follow (Server-Sent Events), cancel and
delete trainings, and fetch their sample images."""

import asyncio
import pathlib
import re
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from schemas import TrainingCreated, TrainingForm, TrainingList, TrainingResponse
from sd_server.api.dependencies import (
    BusDep,
    CurrentUser,
    DecodingDep,
    LookupsDep,
    SettingsDep,
    StorageDep,
    TrainingDep,
    TrainingsDep,
    VisibleUser,
)
from sd_server.api.errors import body_validation_error, error_responses
from sd_server.api.presenters import training_links, training_response
from sd_server.api.routes.images import stored_image
from sd_server.api.sse import event_response, follow
from sd_server.api.submissions import checked_webhook
from sd_server.domain.trainings import (
    BUILT_IN_DEFAULTS,
    SAMPLE_PROMPTS,
    Training,
    TrainingSettings,
    check_recipe_extras,
)
from sd_server.errors import (
    ConflictError,
    InvalidFieldError,
    InvalidPhotoError,
    ModelLoadError,
    NotFoundError,
    TrainingLimitError,
    UnknownUserError,
    first_line,
)
from sd_server.jobs.trainings import fingerprint
from sd_server.observability.logging import request_id_var
from sd_server.storage.model_files import TRAINING_DEFAULTS_FILE, training_defaults
from sd_server.storage.photos import (
    MAX_PHOTO_BYTES,
    MAX_PHOTOS,
    Photo,
    checked_photos,
    photos_in_archive,
    prepare_photo,
    review_photos,
)

trainings_router = APIRouter(tags=["trainings"])
RECIPE_EXTRAS = ("sample_templates", "evaluator")  # in a base's recipe beside the form's fields
TRAINING_UPLOAD_PATHS = re.compile(r"/users/[^/]+/trainings")  # bodies up to SD_MAX_TRAINING_UPLOAD_BYTES
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


async def read_upload(request: Request) -> tuple[list[Photo], bytes | None, TrainingForm]:
    """The multipart body, read only now (after the key, the user's room for a training and the size were checked):
    the photos of `images`, or the zip in `archive` (unpacked later, on the decoding pool), and the fields; 422 naming
    the field that is missing or invalid. Nothing is decoded here."""
    form = await request.form(max_files=MAX_PHOTOS + 1, max_fields=len(TrainingForm.model_fields) + 1)
    try:
        fields = {name: value for name, value in form.items() if name not in ("images", "archive")}
        try:
            settings = TrainingForm.model_validate(fields)
        except ValidationError as error:
            raise body_validation_error(error) from error
        return *await uploaded_files(form), settings
    finally:
        await form.close()


async def uploaded_files(form: FormData) -> tuple[list[Photo], bytes | None]:
    """The form's files: each photo of `images`, or the zip in `archive` as it is."""
    images = [upload for upload in form.getlist("images") if isinstance(upload, UploadFile)]
    archive = form.get("archive")
    if images and isinstance(archive, UploadFile):
        raise InvalidPhotoError("send the photos as `images` or as one zip in `archive`, not both")
    if isinstance(archive, UploadFile):
        return [], await archive.read()
    if not images:
        raise InvalidPhotoError("no photos: send 3 or more files in the repeated field `images`, or a zip in `archive`")
    return [await read_photo(upload, index) for index, upload in enumerate(images)], None


async def read_photo(upload: UploadFile, index: int) -> Photo:
    """One uploaded photo; 422 naming it when its file is over MAX_PHOTO_BYTES (checked before it is read)."""
    name = upload.filename or f"images[{index}]"
    if upload.size is not None and upload.size > MAX_PHOTO_BYTES:
        raise InvalidPhotoError(f"{name}: {upload.size} bytes; a photo may have at most {MAX_PHOTO_BYTES}")
    return Photo(name, await upload.read())


async def base_recipe(models_dir: pathlib.Path, base: str) -> dict[str, object]:
    """The base's own recipe (its ``training_defaults.json``), read off the event loop and checked: its form fields as
    a form's are, its sample prompts and evaluator; empty when it has none. 503 naming the file when it is not JSON,
    not an object, or not a valid recipe: the operator's error, never the user's."""
    try:
        defaults = await asyncio.to_thread(training_defaults, models_dir, base)
        fields = {name: value for name, value in defaults.items() if name not in RECIPE_EXTRAS}
        extras = {name: value for name, value in defaults.items() if name in RECIPE_EXTRAS}
        recipe = TrainingForm.model_validate(fields).model_dump(exclude_unset=True, exclude={"webhook_url"})
        check_recipe_extras(extras.get("sample_templates", SAMPLE_PROMPTS), extras.get("evaluator"))
    except (ValidationError, ValueError) as error:  # ValidationError is a ValueError; named for the reader
        raise ModelLoadError(f"base '{base}': its {TRAINING_DEFAULTS_FILE} is not a valid recipe", detail=first_line(error)) from error
    return {**recipe, **extras}


def training_settings(form: TrainingForm, base: str, recipe: dict[str, object], max_steps: int) -> TrainingSettings:
    """What the training runs with: the fields the upload gave, over the base's recipe (``base_recipe``), over the
    built-in defaults; 422 for more steps than SD_MAX_TRAINING_STEPS."""
    chosen = {**recipe, **form.model_dump(exclude_unset=True, exclude={"webhook_url"})}
    origin = f"{base}/{TRAINING_DEFAULTS_FILE}" if recipe else BUILT_IN_DEFAULTS
    setup = TrainingSettings(**chosen, defaults_from=origin)
    if setup.steps > max_steps:
        raise InvalidFieldError(f"steps: at most {max_steps} (SD_MAX_TRAINING_STEPS)", field="steps")
    return setup


def created(training: Training, response: Response) -> TrainingCreated:
    """The 202 answer for ``training``, with its Location."""
    response.headers["Location"] = f"/trainings/{training.id}"
    return TrainingCreated(training_id=training.id, status=training.status, photos=training.photo_count, links=training_links(training))


@trainings_router.post(
    "/users/{user_id}/trainings",
    status_code=202,
    responses=error_responses(NotFoundError, UnknownUserError, ConflictError, TrainingLimitError),
    openapi_extra={"requestBody": TRAINING_UPLOAD_BODY},
)
async def create_training(
    user_id: VisibleUser,
    principal: CurrentUser,
    request: Request,
    trainings: TrainingsDep,
    settings: SettingsDep,
    decoding: DecodingDep,
    lookups: LookupsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="Retrying with the same key returns the same training.")] = None,
) -> TrainingCreated:
    """Train a LoRA of the user's subject from their photos (multipart: `images` repeated, or a zip in `archive`,
    and the settings as form fields; a field left out takes the base model's recipe, its `training_defaults.json`,
    else the default shown). A person's photos (`class_word` person, woman, man...) need one face each and are
    cropped around it; near-duplicates are left out and listed in `warnings`. Answers at once; follow it at
    `links.self` or `links.events` (with a `samples` event every SD_TRAINING_SAMPLE_EVERY steps). On success the
    LoRA becomes the user's model (unless `activate=false`). A user's own key may train their own model. The cheap
    checks come first (the key, one training at a time, the fields, counts and sizes from the files' headers); the
    photos are decoded last, on a pool of their own."""
    if idempotency_key is None:
        trainings.check_room(user_id)  # 429 before the body is read (a repeat with a key may find its training)
    photos, archive, form = await read_upload(request)
    base = trainings.base_for(user_id)
    training_setup = training_settings(form, base, await base_recipe(settings.models_dir, base), settings.max_training_steps)
    webhook_url = await checked_webhook(form.webhook_url, lookups, settings.webhook_allow_private)
    upload_fingerprint = fingerprint(training_setup, [archive] if archive is not None else [photo.data for photo in photos], webhook_url)
    if (repeat := await asyncio.to_thread(trainings.repeat_of, user_id, idempotency_key, upload_fingerprint)) is not None:
        return created(repeat, response)
    with trainings.reservation(user_id) as reservation:
        if archive is not None:
            photos = await decoding.run(photos_in_archive, archive, settings.max_training_upload_bytes)
            archive = None  # its photos replace it in memory
        photos = await decoding.run(checked_photos, photos, settings.training_min_photo_side)  # all counted and checked first
        resolution, faces = training_setup.resolution, training_setup.looks_for_faces
        # One photo a task: another request's decoding waits for at most one photo of this one.
        prepared = [await decoding.run(prepare_photo, photo, resolution, settings.training_min_photo_side, faces) for photo in photos]
        kept, warnings = review_photos(prepared, require_one_face=training_setup.requires_faces)
        training, _ = await asyncio.to_thread(
            trainings.submit, reservation, base, training_setup, [photo.image for photo in kept], upload_fingerprint, webhook_url,
            idempotency_key, request_id_var.get(), principal.key_id, warnings,
        )  # fmt: skip
    return created(training, response)


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
    shown, total = await asyncio.to_thread(trainings.page, user_id, limit, offset)  # live progress for active ones
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
async def training_events(training: TrainingDep, bus: BusDep) -> StreamingResponse:
    """Server-Sent Events: the current state first, then each change (`progress` with the step and loss, `samples`
    with the URLs of the samples drawn at a step); the stream ends with the training."""
    present = lambda: training_response(training).model_dump(mode="json")  # noqa: E731
    return event_response(follow(bus, training, lambda: training.status.value, present))


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
async def get_sample(
    training: TrainingDep,
    storage: StorageDep,
    index: Annotated[int, Path(ge=0, le=99)],
    step: Annotated[int | None, Query(ge=1, description="The samples drawn at this step while it trained (the `samples` events).")] = None,
) -> Response:
    """A sample image drawn with the trained LoRA, or with the adapter as it was at ``step``."""
    if step is not None and step not in training.progress_samples:
        drawn = ", ".join(str(at) for at in sorted(training.progress_samples)) or "none yet"
        raise NotFoundError(f"training {training.id} drew no samples at step {step} (steps with samples: {drawn})")
    keys = training.samples if step is None else training.progress_samples[step]
    if index >= len(keys):
        raise NotFoundError(f"training {training.id} has {len(keys)} samples{'' if step is None else f' at step {step}'}")
    return stored_image(storage, keys[index])
