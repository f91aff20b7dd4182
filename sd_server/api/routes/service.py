"""The service's own routes: a root with links, liveness, readiness, and Prometheus metrics."""

from fastapi import APIRouter, Depends, Request, Response

from schemas import CacheStats, HealthResponse, QueueStats, RootResponse
from sd_server import VERSION
from sd_server.api.dependencies import EngineDep, QueueDep, metrics_access
from sd_server.api.errors import error_responses
from sd_server.errors import ForbiddenError, ServiceUnavailableError

service_router = APIRouter(tags=["service"])


@service_router.get("/health")
async def health(engine: EngineDep, queue: QueueDep) -> HealthResponse:
    """Answers at once, also while a generation runs."""
    report = engine.report()
    return HealthResponse(
        status="ok",
        device=report["device"],
        dtype=report["dtype"],
        loaded_models=report["loaded_models"],
        version=VERSION,
        queue=QueueStats(**queue.stats()),
        cache=CacheStats(**report["cache"]),
    )


@service_router.get("/health/ready", responses=error_responses(ServiceUnavailableError))
async def ready(queue: QueueDep, request: Request) -> dict[str, str]:
    """Readiness: 200 once the default model has loaded, 503 before that and while shutting down."""
    if not queue.ready or getattr(request.app.state, "shutting_down", False):
        raise ServiceUnavailableError(f"not ready: {queue.not_ready_reason}")
    return {"status": "ready"}


@service_router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_access)],
    responses={200: {"content": {"text/plain": {}}}, **error_responses(ForbiddenError)},
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
