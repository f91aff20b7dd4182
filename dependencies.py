"""FastAPI dependencies: who the request acts as, the service objects created in the lifespan, and jobs by id."""

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from auth import OPEN_ACCESS, Principal
from job_queue import JobQueue
from jobs import Job
from model_registry import ModelRegistry
from model_service import ModelService

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, as a header of its own")


def current_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Principal:
    """Who the request acts as: 401 without a valid key when keys are required; counts the rate limit."""
    authenticator = request.app.state.authenticator
    principal = OPEN_ACCESS
    if authenticator.required:
        key = api_key or (bearer.credentials if bearer else None)
        if not key:
            message = "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>"
            raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})
        principal = authenticator.keys.authenticate(key)
        if principal is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    request.app.state.rate_limiter.hit(principal, request.client.host if request.client else "unknown")
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def require_admin(principal: CurrentUser) -> Principal:
    """403 unless the key is an admin's."""
    if not principal.is_admin:
        raise HTTPException(403, "this route needs an admin key")
    return principal


AdminUser = Annotated[Principal, Depends(require_admin)]


def metrics_access(request: Request) -> None:
    """Open, unless SD_METRICS_REQUIRE_ADMIN: then an admin key. Reads the headers itself, so that the schema
    shows /metrics as open, which is its default."""
    if request.app.state.settings.metrics_require_admin:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" else None
        require_admin(current_principal(request, bearer, request.headers.get("x-api-key")))


def get_model_service(request: Request) -> ModelService:
    """The one ModelService, created in the lifespan."""
    return request.app.state.model_service


def get_job_queue(request: Request) -> JobQueue:
    """The one JobQueue, created in the lifespan."""
    return request.app.state.job_queue


def get_registry(request: Request) -> ModelRegistry:
    """The user -> model registry, created in the lifespan."""
    return request.app.state.registry


ServiceDep = Annotated[ModelService, Depends(get_model_service)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]


def get_job(
    job_id: Annotated[str, Path(description="The id POST /jobs answered.")], queue: QueueDep, principal: CurrentUser
) -> Job:
    """The job with that id, if the caller may see it; 404 otherwise (another user's job is not revealed)."""
    job = queue.store.get(job_id)
    if job is None or not principal.can_access(job.request.user_id):
        raise HTTPException(404, f"no job '{job_id}' (deleted, or removed by SD_RETENTION_DAYS)")
    return job


JobDep = Annotated[Job, Depends(get_job)]
