"""The HTTP API: thin routes that validate, call the model service, and shape the response."""

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from auth import Authenticator, ForbiddenError, KeyStore
from config import DEFAULT_USER, Settings
from database import create_database_engine, migrate
from dependencies import AdminUser, CurrentUser, QueueDep, RegistryDep, ServiceDep, metrics_access
from job_queue import IdempotencyConflictError, JobFinishedError, JobQueue, JobTooLargeError, QueueFullError
from job_routes import image_path, images_router, job_response, jobs_router
from job_store import SqlJobStore
from jobs import Job
from key_routes import keys_router
from lora_uploads import UPLOAD_PATHS
from metrics import Metrics
from middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    configure_logging,
    request_id_var,
)
from model_registry import DefaultUserError, InvalidSourceError, ModelRegistry, UnknownUserError
from model_service import ModelService
from quotas import QuotaExceededError, RateLimiter
from schemas import (
    CacheClearResponse,
    CacheStats,
    ErrorResponse,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    JobStatus,
    ModelsResponse,
    QueueStats,
    RootResponse,
)
from storage import create_storage
from user_routes import users_router
from webhooks import UnsafeWebhookError, WebhookSender

VERSION = "0.5.0"
logger = logging.getLogger(__name__)

GENERATION_ERRORS = {
    404: {"model": ErrorResponse, "description": "The user has no model."},
    403: {"model": ErrorResponse, "description": "The key acts as another user."},
    500: {"model": ErrorResponse, "description": "The pipeline failed; the detail says how."},
    503: {"model": ErrorResponse, "description": "The model could not be loaded, or the device ran out of memory."},
    504: {"model": ErrorResponse, "description": "The job did not finish within SD_JOB_TIMEOUT_S."},
}


COMMON_ERRORS = {
    401: {"model": ErrorResponse, "description": "No API key, or an invalid one (when keys are required)."},
    413: {"model": ErrorResponse, "description": "The request body is over SD_MAX_BODY_BYTES (SD_MAX_UPLOAD_BYTES for LoRA uploads)."},
    429: {"model": ErrorResponse, "description": "Rate limit, job cap or full queue; retry after Retry-After."},
    500: {"model": ErrorResponse, "description": "An unexpected error; the detail names it."},
    503: {"model": ErrorResponse, "description": "Shutting down, or the model cannot be loaded."},
}


class ClientDisconnectedError(Exception):
    """The client of a synchronous request went away; its job was cancelled."""


generation_router = APIRouter(tags=["generation"])
models_router = APIRouter(tags=["models"])
service_router = APIRouter(tags=["service"])


async def run_job(request: GenerateRequest, queue: JobQueue, http_request: Request) -> Job:
    """Queue ``request`` as a job and wait for it; a client that disconnects cancels it."""
    # The database write runs off the event loop (asyncio.to_thread copies the request-id context along).
    job, _ = await asyncio.to_thread(queue.submit, request, synchronous=True, request_id=request_id_var.get())
    while not job.finished.is_set():
        with suppress(TimeoutError):
            await asyncio.wait_for(job.finished.wait(), timeout=0.25)
        if not job.finished.is_set() and await http_request.is_disconnected():
            with suppress(JobFinishedError):
                await asyncio.to_thread(queue.cancel, job)
            raise ClientDisconnectedError(job.id)
    if job.status is JobStatus.failed:
        raise HTTPException(job.error_status or 500, job.error)
    if job.status is JobStatus.cancelled:
        raise HTTPException(409, f"job {job.id} was cancelled (POST /jobs/{job.id}/cancel)")
    return job


@generation_router.post("/generate", responses=GENERATION_ERRORS)
async def generate(
    request: GenerateRequest, queue: QueueDep, principal: CurrentUser, http_request: Request
) -> GenerateResponse:
    """Generate images with the user's model; they come back as base64 PNGs with their seeds."""
    request = principal.resolve_user(request)
    job = await run_job(request, queue, http_request)
    images = [
        GeneratedImage(
            image_base64=base64.b64encode(png).decode("ascii"),
            seed=image.seed,
            image_path=image_path(image, queue.storage),
        )
        for png, image in zip(job.take_pngs(), job.images)
    ]
    return GenerateResponse(
        image_base64=images[0].image_base64,
        images=images,
        seed=job.seed,
        model_id=job.model_id,
        user_id=request.user_id,
        generation_time=round(job.generation_seconds or 0.0, 3),
        image_path=images[0].image_path,
        parameters=job.parameters,
    )


@generation_router.post(
    "/generate/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG, seed and model in headers."}, **GENERATION_ERRORS},
)
async def generate_image(
    request: GenerateRequest, queue: QueueDep, principal: CurrentUser, http_request: Request
) -> Response:
    """Generate one image and answer with the PNG itself (headers X-Seed, X-Model-Id, X-Generation-Time)."""
    if request.num_images != 1:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "num_images"), "msg": "must be 1 for /generate/image; use /generate for more", "input": request.num_images}]
        )
    job = await run_job(principal.resolve_user(request), queue, http_request)
    headers = {"X-Seed": str(job.seed), "X-Model-Id": job.model_id, "X-Generation-Time": f"{job.generation_seconds:.3f}"}
    return Response(content=job.take_pngs()[0], media_type="image/png", headers=headers)


@models_router.get("/models")
async def list_models(service: ServiceDep, registry: RegistryDep, admin: AdminUser) -> ModelsResponse:
    """Which model serves which user, which are in memory now, and the cache per tier."""
    return ModelsResponse(
        default_model=registry.get(DEFAULT_USER).label,
        user_models=registry.all(),
        loaded_models=service.loaded_models(),
        cache=CacheStats(**service.cache_report()),
    )


@models_router.delete("/cache")
async def clear_cache(
    service: ServiceDep,
    admin: AdminUser,
    model_id: Annotated[str | None, Query(description="Unload only this model; left out, every model.")] = None,
) -> CacheClearResponse:
    """Unload cached checkpoints (and their LoRA adapters) and free their memory; a later request loads them again."""
    return CacheClearResponse(unloaded=await asyncio.to_thread(service.unload, model_id))


@service_router.get("/health")
async def health(service: ServiceDep, queue: QueueDep) -> HealthResponse:
    """Answers at once, also while a generation runs."""
    return HealthResponse(
        status="ok",
        device=service.device,
        dtype=str(service.dtype).removeprefix("torch."),
        loaded_models=service.loaded_models(),
        version=VERSION,
        queue=QueueStats(**queue.stats()),
        cache=CacheStats(**service.cache_report()),
    )


@service_router.get("/health/ready", responses={503: {"model": ErrorResponse, "description": "Not ready: why."}})
async def ready(queue: QueueDep, request: Request) -> dict[str, str]:
    """Readiness: 200 once the default model has loaded, 503 before that and while shutting down."""
    if not queue.ready or getattr(request.app.state, "shutting_down", False):
        raise HTTPException(503, f"not ready: {queue.not_ready_reason}")
    return {"status": "ready"}


@service_router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_access)],
    responses={200: {"content": {"text/plain": {}}}, 403: {"model": ErrorResponse, "description": "Not an admin key."}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (SD_METRICS_REQUIRE_ADMIN=true puts them behind an admin key)."""
    return Response(request.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4")


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
            "jobs": "POST /jobs, GET /jobs, GET /jobs/{job_id}, GET /jobs/{job_id}/events, POST /jobs/{job_id}/cancel, DELETE /jobs/{job_id}",
            "images": "GET /images/{name}",
            "keys": "POST /keys, GET /keys, DELETE /keys/{key_id}",
            "users": "GET, PUT, DELETE /users/{user_id}/model; POST /users/{user_id}/lora",
            "ready": "GET /health/ready",
            "metrics": "GET /metrics",
            "openapi": "GET /openapi.json",
        },
    )


def error_handler(status_code: int):
    """An exception handler that answers ``{"detail": str(error)}`` with ``status_code``."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status_code, error)
        return JSONResponse({"detail": str(error)}, status_code=status_code)

    return handle


def invalid_field(location: tuple[str, ...]):
    """An exception handler that answers 422 in FastAPI's validation-error shape, at ``location`` (then the
    error's ``field``, when it names one)."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        field = getattr(error, "field", None)
        detail = [{"type": "value_error", "loc": [*location, *([field] if field else [])], "msg": str(error), "input": None}]
        return JSONResponse({"detail": detail}, status_code=422)

    return handle


async def too_many_requests(request: Request, error: QueueFullError | QuotaExceededError) -> JSONResponse:
    """429 with Retry-After: the queue is full, or a rate limit or job cap was reached."""
    return JSONResponse({"detail": str(error)}, status_code=429, headers={"Retry-After": str(error.retry_after_s)})


async def client_disconnected(request: Request, error: ClientDisconnectedError) -> Response:
    """Nobody reads this answer: the client left and its job was cancelled."""
    logger.info("client of %s %s left; job %s cancelled", request.method, request.url.path, error)
    return Response(status_code=499)


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """Any other failure: a JSON 500 that names the error; the server keeps running."""
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application, with its model service created in the lifespan from ``settings``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format)
        service = ModelService(settings)
        await asyncio.to_thread(migrate, settings.effective_database_url)
        engine = create_database_engine(settings.effective_database_url)
        registry = await asyncio.to_thread(ModelRegistry, settings, engine)
        queue = JobQueue(settings, service, registry, SqlJobStore(engine), create_storage(settings))
        webhooks = WebhookSender(
            settings.webhook_retries, settings.webhook_backoff_s, settings.webhook_timeout_s, settings.webhook_allow_private
        )

        def send_webhook(job: Job) -> None:
            if job.webhook_url:
                webhooks.send(job.webhook_url, job_response(job, queue).model_dump(mode="json"))

        app.state.metrics = queue.observer = Metrics()
        app.state.metrics.watch(queue, service)
        app.state.authenticator = await asyncio.to_thread(Authenticator, settings, KeyStore(engine))
        app.state.rate_limiter = RateLimiter(settings.rate_limit)
        app.state.settings, app.state.shutting_down = settings, False
        queue.on_terminal(send_webhook)
        queue.start()
        app.state.model_service, app.state.job_queue, app.state.registry = service, queue, registry
        logger.info("serving on %s (%s); default model %s", service.device, service.dtype, settings.default_model)
        if not app.state.authenticator.required:
            logger.warning("no API key is required (SD_AUTH=%s, no keys): anyone who reaches this port can use it", settings.auth)
        yield
        app.state.shutting_down = True
        await queue.stop()
        await webhooks.close()
        await asyncio.to_thread(service.unload)
        engine.dispose()

    app = FastAPI(
        title="Personalized Stable Diffusion API",
        version=VERSION,
        responses=COMMON_ERRORS,
        description="Per-user Stable Diffusion 1.5 (DreamBooth) image generation.",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        upload_bytes=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials="*" not in settings.cors_origins,  # never a wildcard origin with credentials
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Seed", "X-Model-Id", "X-Generation-Time", "X-Request-ID", "Retry-After"],
    )
    app.add_middleware(RequestContextMiddleware)
    app.add_exception_handler(UnknownUserError, error_handler(404))
    app.add_exception_handler(DefaultUserError, error_handler(409))
    app.add_exception_handler(InvalidSourceError, invalid_field(("body",)))
    app.add_exception_handler(JobFinishedError, error_handler(409))
    app.add_exception_handler(IdempotencyConflictError, error_handler(409))
    app.add_exception_handler(QueueFullError, too_many_requests)
    app.add_exception_handler(QuotaExceededError, too_many_requests)
    app.add_exception_handler(ForbiddenError, error_handler(403))
    app.add_exception_handler(JobTooLargeError, invalid_field(("body",)))
    app.add_exception_handler(UnsafeWebhookError, invalid_field(("body", "webhook_url")))
    app.add_exception_handler(ClientDisconnectedError, client_disconnected)
    app.add_exception_handler(Exception, unexpected_error)
    for router in (generation_router, jobs_router, images_router, models_router, users_router, keys_router, service_router):
        app.include_router(router)
    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    settings = Settings()
    uvicorn.run("main:app", host=settings.host, port=settings.port)
