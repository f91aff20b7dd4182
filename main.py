"""The HTTP API: thin routes that validate, call the model service, and shape the response."""

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from config import Settings
from model_service import (
    DeviceOutOfMemoryError,
    Generation,
    GenerationError,
    ModelLoadError,
    ModelService,
    UnknownUserError,
)
from schemas import (
    CacheClearResponse,
    ErrorResponse,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelsResponse,
    RootResponse,
)

VERSION = "0.1.0"
logger = logging.getLogger(__name__)


def get_model_service(request: Request) -> ModelService:
    """The one ModelService, created in the lifespan."""
    return request.app.state.model_service


ServiceDep = Annotated[ModelService, Depends(get_model_service)]

ERRORS = {
    404: {"model": ErrorResponse, "description": "The user has no model."},
    500: {"model": ErrorResponse, "description": "The pipeline failed; the detail says how."},
    503: {"model": ErrorResponse, "description": "The model could not be loaded, or the device ran out of memory."},
}

generation_router = APIRouter(tags=["generation"])
models_router = APIRouter(tags=["models"])
service_router = APIRouter(tags=["service"])


@generation_router.post("/generate", responses=ERRORS)
async def generate(request: GenerateRequest, service: ServiceDep) -> GenerateResponse:
    """Generate images with the user's model; they come back as base64 PNGs with their seeds."""
    generation = await service.generate(request)
    images = [
        GeneratedImage(
            image_base64=base64.b64encode(image.png).decode("ascii"),
            seed=image.seed,
            image_path=str(image.path) if image.path else None,
        )
        for image in generation.images
    ]
    return GenerateResponse(
        image_base64=images[0].image_base64,
        images=images,
        seed=images[0].seed,
        model_id=generation.model_id,
        user_id=request.user_id,
        generation_time=round(generation.seconds, 3),
        image_path=images[0].image_path,
        parameters=generation.parameters,
    )


@generation_router.post(
    "/generate/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG, seed and model in headers."}, **ERRORS},
)
async def generate_image(request: GenerateRequest, service: ServiceDep) -> Response:
    """Generate one image and answer with the PNG itself (headers X-Seed, X-Model-Id, X-Generation-Time)."""
    if request.num_images != 1:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "num_images"), "msg": "must be 1 for /generate/image; use /generate for more", "input": request.num_images}]
        )
    generation = await service.generate(request)
    return Response(content=generation.images[0].png, media_type="image/png", headers=image_headers(generation))


def image_headers(generation: Generation) -> dict[str, str]:
    """The headers that describe a PNG answered alone."""
    return {
        "X-Seed": str(generation.images[0].seed),
        "X-Model-Id": generation.model_id,
        "X-Generation-Time": f"{generation.seconds:.3f}",
    }


@models_router.get("/models")
async def list_models(service: ServiceDep) -> ModelsResponse:
    """Which model serves which user, and which models are in memory now."""
    settings = service.settings
    return ModelsResponse(
        default_model=settings.default_model,
        user_models=settings.user_model_map,
        loaded_models=service.loaded_models(),
        max_loaded_models=settings.max_loaded_models,
    )


@models_router.delete("/cache")
async def clear_cache(
    service: ServiceDep,
    model_id: Annotated[str | None, Query(description="Unload only this model; left out, every model.")] = None,
) -> CacheClearResponse:
    """Unload cached pipelines and free their memory; a later request loads them again."""
    return CacheClearResponse(unloaded=await service.unload(model_id))


@service_router.get("/health")
async def health(service: ServiceDep) -> HealthResponse:
    """Answers at once, also while a generation runs."""
    return HealthResponse(
        status="ok",
        device=service.device,
        dtype=str(service.dtype).removeprefix("torch."),
        loaded_models=service.loaded_models(),
        version=VERSION,
    )


@service_router.get("/")
async def root() -> RootResponse:
    """Service name, version, and links to the docs and endpoints."""
    return RootResponse(
        name="Personalized Stable Diffusion API",
        version=VERSION,
        docs="/docs",
        endpoints={
            "generate": "POST /generate",
            "generate_image": "POST /generate/image",
            "health": "GET /health",
            "models": "GET /models",
            "clear_cache": "DELETE /cache",
            "openapi": "GET /openapi.json",
        },
    )


def error_handler(status_code: int):
    """An exception handler that answers ``{"detail": str(error)}`` with ``status_code``."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status_code, error)
        return JSONResponse({"detail": str(error)}, status_code=status_code)

    return handle


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """Any other failure: a JSON 500 that names the error; the server keeps running."""
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application, with its model service created in the lifespan from ``settings``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        service = ModelService(settings)
        app.state.model_service = service
        logger.info("serving on %s (%s); default model %s", service.device, service.dtype, settings.default_model)
        yield
        await anyio.to_thread.run_sync(service.close)

    app = FastAPI(
        title="Personalized Stable Diffusion API",
        version=VERSION,
        description="Per-user Stable Diffusion 1.5 (DreamBooth) image generation.",
        lifespan=lifespan,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Seed", "X-Model-Id", "X-Generation-Time"],
    )
    app.add_exception_handler(UnknownUserError, error_handler(404))
    app.add_exception_handler(ModelLoadError, error_handler(503))
    app.add_exception_handler(DeviceOutOfMemoryError, error_handler(503))
    app.add_exception_handler(GenerationError, error_handler(500))
    app.add_exception_handler(Exception, unexpected_error)
    for router in (generation_router, models_router, service_router):
        app.include_router(router)
    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    settings = Settings()
    uvicorn.run("main:app", host=settings.host, port=settings.port)
