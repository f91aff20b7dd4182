"""The service's own routes: a root with links, liveness, readiness, and Prometheus metrics."""

from fastapi import APIRouter, Depends, Request, Response

from schemas import CacheStats, CompileStats, HealthResponse, PartStatus, ProvenanceSettings, QueueStats, RootResponse
from sd_server import VERSION
from sd_server.api.dependencies import MaybeUser, ServicesDep, metrics_access
from sd_server.api.errors import error_responses
from sd_server.errors import ForbiddenError, ServiceUnavailableError

service_router = APIRouter(tags=["service"])


@service_router.get(
    "/health",
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse, "description": "A part of the service is dead (see `parts`)."}},
    openapi_extra={"security": [{}, {"HTTPBearer": []}, {"APIKeyHeader": []}]},  # a key is optional: it adds details
)
async def health(services: ServicesDep, principal: MaybeUser, response: Response) -> HealthResponse:
    """Answers at once, also while a generation runs: ok, degraded or not ok (503), and the version; an admin key
    (or open mode) also gets the device, models, queue, cache, each part's state and the provenance marks that are on."""
    parts = services.liveness.report()
    states = {part["state"] for part in parts.values()}
    status = "not ok" if "dead" in states else "degraded" if "failing" in states else "ok"
    if status == "not ok":
        response.status_code = 503
    if principal is None or not principal.is_admin:
        return HealthResponse(status=status, version=VERSION)
    report = services.engine.report()
    return HealthResponse(
        status=status,
        version=VERSION,
        device=report["device"],
        dtype=report["dtype"],
        loaded_models=report["loaded_models"],
        queue=QueueStats(**services.dispatcher.stats()),
        cache=CacheStats(**report["cache"]),
        device_memory_peak_bytes=report["device_memory_peak_bytes"],
        compile=CompileStats(**report["compile"]),
        parts={name: PartStatus(**part) for name, part in parts.items()},
        provenance=ProvenanceSettings.model_validate(services.provenance.report()),
    )


@service_router.get("/health/ready", responses=error_responses(ServiceUnavailableError))
async def ready(services: ServicesDep, request: Request) -> dict[str, str]:
    """Readiness: 200 once the default model has loaded; 503 naming why before that, while shutting down, and while
    a part is dead (or the database is failing)."""
    reasons = services.liveness.problems()
    if getattr(request.app.state, "shutting_down", False):  # set by the lifespan, read by the middleware too
        reasons.insert(0, "shutting down")
    elif not services.readiness.ready:
        reasons.insert(0, services.readiness.reason)
    if reasons:
        raise ServiceUnavailableError(f"not ready: {'; '.join(reasons)}")
    return {"status": "ready"}


@service_router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_access)],
    responses={200: {"content": {"text/plain": {}}}, **error_responses(ForbiddenError)},
)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics (SD_METRICS_REQUIRE_ADMIN=true puts them behind an admin key)."""
    return Response(services.metrics.exposition(), media_type="text/plain; version=0.0.4")


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
            "trainings": "POST /users/{user_id}/trainings, GET /trainings, GET /trainings/{training_id} (events, samples, cancel)",
            "styles": "GET /styles, GET, PUT, DELETE /styles/{name}",
            "provenance": "POST /provenance/verify (credentials, metadata and watermark of any image)",
            "a1111": "POST /sdapi/v1/txt2img, POST /sdapi/v1/img2img, GET /sdapi/v1/progress, ... (AUTOMATIC1111's API)",
            "session": "POST, GET, DELETE /session (browsers: a key for a session cookie)",
            "web_app": "GET /ui/",
            "ready": "GET /health/ready",
            "metrics": "GET /metrics",
            "openapi": "GET /openapi.json",
        },
    )
