"""GET /models and DELETE /cache: which model serves which user, what is in memory, and unloading it."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from schemas import CacheClearResponse, CacheStats, ModelsResponse
from sd_server.api.dependencies import AdminUser, EngineDep, RegistryDep
from sd_server.api.errors import error_responses
from sd_server.domain.models import DEFAULT_USER
from sd_server.errors import ForbiddenError

models_router = APIRouter(tags=["models"], responses=error_responses(ForbiddenError))


@models_router.get("/models")
async def list_models(engine: EngineDep, registry: RegistryDep, admin: AdminUser) -> ModelsResponse:
    """Which model serves which user, which are in memory now, and the cache per tier."""
    report = engine.report()
    return ModelsResponse(
        default_model=registry.get(DEFAULT_USER).label,
        user_models=registry.all(),
        loaded_models=report["loaded_models"],
        cache=CacheStats(**report["cache"]),
    )


@models_router.delete("/cache")
async def clear_cache(
    engine: EngineDep,
    admin: AdminUser,
    model_id: Annotated[str | None, Query(description="Unload only this model; left out, every model.")] = None,
) -> CacheClearResponse:
    """Unload cached checkpoints (and their LoRA adapters) and free their memory; a later request loads them again."""
    return CacheClearResponse(unloaded=await asyncio.to_thread(engine.unload, model_id))
