"""Routes of the user -> model registry: read a user's model, set or remove it (admin), upload a LoRA (admin)."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Form, HTTPException, Path, Response, UploadFile

from config import DEFAULT_USER
from dependencies import AdminUser, CurrentUser, RegistryDep, ServiceDep
from lora_uploads import keep_upload, stage_upload
from model_registry import InvalidSourceError, ModelRegistry
from model_service import InvalidAdapterError, ModelService
from schemas import USER_ID_PATTERN, USER_MODEL_EXAMPLES, ErrorResponse, LoraModel, UserModel, UserModelResponse

users_router = APIRouter(prefix="/users/{user_id}", tags=["users"])


def visible_user(
    user_id: Annotated[str, Path(pattern=USER_ID_PATTERN, description="The user whose model this is.")],
    principal: CurrentUser,
) -> str:
    """The user in the path, when the caller may see it (an admin, or that user's key); 404 otherwise."""
    if not principal.can_access(user_id):
        raise HTTPException(404, f"user '{user_id}' has no model")
    return user_id


VisibleUser = Annotated[str, Depends(visible_user)]


def managed_user(user_id: VisibleUser, admin: AdminUser) -> str:
    """The user in the path, when the caller is an admin (a user's own key gets 403)."""
    return user_id


ManagedUser = Annotated[str, Depends(managed_user)]
NOT_FOUND = {404: {"model": ErrorResponse, "description": "The user has no model (or is another user's)."}}
ADMIN_ONLY = {403: {"model": ErrorResponse, "description": "Not an admin key."}, **NOT_FOUND}


def model_response(user_id: str, model: UserModel, registry: ModelRegistry) -> UserModelResponse:
    """The API's view of one registry entry."""
    return UserModelResponse(user_id=user_id, model=model, origin=registry.origin(user_id))


def unload_if_unused(model: UserModel | None, registry: ModelRegistry, service: ModelService) -> None:
    """Unload a model that no user runs on any more: a LoRA comes off its base, a checkpoint leaves memory."""
    if model is None or registry.is_used(model):
        return
    if isinstance(model, LoraModel):
        service.unload_adapter(model)
    else:
        service.unload(model.source)


@users_router.get("/model", responses=NOT_FOUND)
async def get_user_model(user_id: VisibleUser, registry: RegistryDep) -> UserModelResponse:
    """The user's model: a checkpoint, or a LoRA on a base checkpoint."""
    return model_response(user_id, registry.get(user_id), registry)


@users_router.put("/model", responses=ADMIN_ONLY)
async def set_user_model(
    user_id: ManagedUser,
    model: Annotated[UserModel, Body(examples=USER_MODEL_EXAMPLES)],
    registry: RegistryDep,
    service: ServiceDep,
) -> UserModelResponse:
    """Give the user a checkpoint or a LoRA (local paths must be inside SD_MODELS_DIR); kept across restarts."""
    await asyncio.to_thread(registry.check_sources, model)
    previous = await asyncio.to_thread(registry.set, user_id, model)
    await asyncio.to_thread(unload_if_unused, previous, registry, service)
    return model_response(user_id, model, registry)


@users_router.delete(
    "/model", status_code=204, responses={**ADMIN_ONLY, 409: {"model": ErrorResponse, "description": "The default user."}}
)
async def delete_user_model(user_id: ManagedUser, registry: RegistryDep, service: ServiceDep) -> Response:
    """Remove the user's model (their requests get 404 from now on) and unload it unless another user runs on it."""
    model = await asyncio.to_thread(registry.remove, user_id)
    await asyncio.to_thread(unload_if_unused, model, registry, service)
    return Response(status_code=204)


@users_router.post("/lora", status_code=201, responses=ADMIN_ONLY)
async def upload_lora(
    user_id: ManagedUser,
    file: Annotated[UploadFile, File(description="A LoRA .safetensors file (diffusers, PEFT or kohya format).")],
    registry: RegistryDep,
    service: ServiceDep,
    base: Annotated[str | None, Form(max_length=500, description="Base checkpoint; left out, the default user's.")] = None,
    scale: Annotated[float, Form(ge=0.0, le=4.0, description="Strength of the adapter.")] = 1.0,
) -> UserModelResponse:
    """Upload a LoRA and make it the user's model; it must load onto the base (else 422, and nothing is stored)."""
    base = base or registry.get(DEFAULT_USER).base
    await asyncio.to_thread(registry.check_checkpoint, base, "base")
    staged, sha256 = await asyncio.to_thread(stage_upload, file.file, registry.models_dir)
    try:
        await asyncio.to_thread(service.check_adapter, base, staged)
    except BaseException as error:
        staged.unlink()
        if isinstance(error, InvalidAdapterError):
            raise InvalidSourceError("file", f"{file.filename}: {error}") from error
        raise
    model = LoraModel(base=base, source=await asyncio.to_thread(keep_upload, staged, sha256), scale=scale)
    previous = await asyncio.to_thread(registry.set, user_id, model)
    await asyncio.to_thread(unload_if_unused, previous, registry, service)
    return model_response(user_id, model, registry)
