"""Routes of the user -> model registry: read a user's model, set or remove it (admin), upload a LoRA (admin)."""

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Body, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from schemas import USER_MODEL_EXAMPLES, UserModelResponse
from sd_server.api.dependencies import EngineDep, ManagedUser, RegistryDep, VisibleUser
from sd_server.api.errors import error_responses
from sd_server.domain.models import DEFAULT_USER, LoraModel, Text, UserModel
from sd_server.errors import (
    DefaultUserError,
    ForbiddenError,
    InvalidAdapterError,
    InvalidSourceError,
    ModelLoadError,
    UnknownUserError,
)
from sd_server.jobs.model_changes import unload_if_unused
from sd_server.registry import ModelRegistry
from sd_server.storage.model_files import keep_upload, stage_upload

users_router = APIRouter(prefix="/users/{user_id}", tags=["users"])
UPLOAD_PATHS = re.compile(r"/users/[^/]+/lora")  # routes whose bodies may reach SD_MAX_UPLOAD_BYTES
NOT_FOUND = error_responses(UnknownUserError)
ADMIN_ONLY = error_responses(ForbiddenError, UnknownUserError)


def model_response(user_id: str, model: UserModel, registry: ModelRegistry) -> UserModelResponse:
    """The API's view of one registry entry."""
    return UserModelResponse(user_id=user_id, model=model, origin=registry.origin(user_id))


@users_router.get("/model", responses=NOT_FOUND)
async def get_user_model(user_id: VisibleUser, registry: RegistryDep) -> UserModelResponse:
    """The user's model: a checkpoint, or a LoRA on a base checkpoint."""
    return model_response(user_id, registry.get(user_id), registry)


@users_router.put("/model", responses=ADMIN_ONLY)
async def set_user_model(
    user_id: ManagedUser,
    model: Annotated[UserModel, Body(examples=USER_MODEL_EXAMPLES)],
    registry: RegistryDep,
    engine: EngineDep,
) -> UserModelResponse:
    """Give the user a checkpoint or a LoRA (local paths must be inside SD_MODELS_DIR); kept across restarts."""
    await asyncio.to_thread(registry.check_sources, model)
    previous = await asyncio.to_thread(registry.set, user_id, model)
    await asyncio.to_thread(unload_if_unused, previous, registry, engine)
    return model_response(user_id, model, registry)


@users_router.delete(
    "/model", status_code=204, responses=error_responses(ForbiddenError, UnknownUserError, DefaultUserError)
)
async def delete_user_model(user_id: ManagedUser, registry: RegistryDep, engine: EngineDep) -> Response:
    """Remove the user's model (their requests get 404 from now on) and unload it unless another user runs on it."""
    model = await asyncio.to_thread(registry.remove, user_id)
    await asyncio.to_thread(unload_if_unused, model, registry, engine)
    return Response(status_code=204)


class LoraUploadForm(BaseModel):
    """The form fields of a LoRA upload, beside the file."""

    model_config = ConfigDict(extra="forbid")

    base: Text | None = Field(None, min_length=1, max_length=500, description="Base checkpoint; left out, the default user's.")
    scale: float = Field(1.0, ge=0.0, le=4.0, allow_inf_nan=False, description="Strength of the adapter.")


LORA_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "A LoRA .safetensors file (diffusers, PEFT or kohya format)."},
                    **LoraUploadForm.model_json_schema()["properties"],
                },
            }
        }
    },
}


async def read_upload(request: Request) -> tuple[UploadFile, LoraUploadForm, FormData]:
    """The multipart body, read only now (after the key and the size were checked): the file and the fields; 422
    naming a field that is missing or invalid. Close the returned form when done."""
    form = await request.form(max_files=1, max_fields=len(LoraUploadForm.model_fields) + 1)
    upload = form.get("file")
    fields = {name: value for name, value in form.items() if name != "file"}
    try:
        if not isinstance(upload, UploadFile):
            raise RequestValidationError([{"type": "missing", "loc": ("body", "file"), "msg": "a .safetensors file is required", "input": None}])
        return upload, LoraUploadForm.model_validate(fields), form
    except ValidationError as error:
        await form.close()
        raise RequestValidationError([{**detail, "loc": ("body", *detail["loc"])} for detail in error.errors()]) from error
    except RequestValidationError:
        await form.close()
        raise


@users_router.post("/lora", status_code=201, responses=ADMIN_ONLY, openapi_extra={"requestBody": LORA_UPLOAD_BODY})
async def upload_lora(user_id: ManagedUser, request: Request, registry: RegistryDep, engine: EngineDep) -> UserModelResponse:
    """Upload a LoRA (multipart: `file`, optional `base` and `scale`) and make it the user's model; it must load onto
    the base (else 422, and nothing is stored). The key is checked before the body is read."""
    upload, fields, form = await read_upload(request)
    try:
        base = fields.base or registry.get(DEFAULT_USER).base
        await asyncio.to_thread(registry.check_checkpoint, base, "base")
        staged, sha256 = await asyncio.to_thread(stage_upload, upload.file, registry.models_dir)
    finally:
        await form.close()
    try:
        await asyncio.to_thread(engine.check_adapter, base, staged)
        source = await asyncio.to_thread(keep_upload, staged, sha256, registry.models_dir)
    except InvalidAdapterError as error:
        raise InvalidAdapterError(f"{upload.filename}: {error.message}", detail=error.detail) from error
    except ModelLoadError as error:
        raise InvalidSourceError(f"base '{base}' could not be loaded to check the file: {error.message}", field="base") from error
    finally:
        staged.unlink(missing_ok=True)  # kept under its hash, or refused
    model = LoraModel(base=base, source=source, scale=fields.scale)
    previous = await asyncio.to_thread(registry.set, user_id, model)
    await asyncio.to_thread(unload_if_unused, previous, registry, engine)
    return model_response(user_id, model, registry)
