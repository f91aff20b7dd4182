"""FastAPI dependencies: who the request acts as, the service objects created in the lifespan, and the resources
a route names in its path, loaded once with their owner checked."""

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from sd_server.domain.jobs import Job
from sd_server.domain.models import USER_ID_PATTERN
from sd_server.domain.trainings import Training
from sd_server.engine.interface import Engine
from sd_server.errors import ForbiddenError, NotFoundError, UnauthorizedError
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.trainings import Trainings
from sd_server.registry import ModelRegistry
from sd_server.security.keys import OPEN_ACCESS, Principal

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, as a header of its own")


def current_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Principal:
    """Who the request acts as: 401 without a valid key when keys are required; counts the rate limit (reads and
    changes have budgets of their own)."""
    principal = identify(request, api_key or (bearer.credentials if bearer else None))
    if principal is None:
        raise UnauthorizedError("an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>")
    reading = request.method in ("GET", "HEAD")
    request.app.state.rate_limiter.hit(principal, request.client.host if request.client else "unknown", reading)
    return principal


def identify(request: Request, key: str | None) -> Principal | None:
    """The principal of ``key`` (everyone is the open-access admin when no key is required); None without a
    key where one is required; 401 for a key that is not valid."""
    authenticator = request.app.state.authenticator
    if not authenticator.required:
        return OPEN_ACCESS
    if not key:
        return None
    principal = authenticator.keys.authenticate(key)
    if principal is None:
        raise UnauthorizedError("invalid API key")
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def optional_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Principal | None:
    """Who the request acts as, or None without a key (for routes that answer everyone, and admins with more)."""
    return identify(request, api_key or (bearer.credentials if bearer else None))


MaybeUser = Annotated[Principal | None, Depends(optional_principal)]


def require_admin(principal: CurrentUser) -> Principal:
    """403 unless the key is an admin's."""
    if not principal.is_admin:
        raise ForbiddenError("this route needs an admin key")
    return principal


AdminUser = Annotated[Principal, Depends(require_admin)]


def metrics_access(request: Request) -> None:
    """Open, unless SD_METRICS_REQUIRE_ADMIN: then an admin key. Reads the headers itself, so that the schema
    shows /metrics as open, which is its default."""
    if request.app.state.settings.metrics_require_admin:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" else None
        require_admin(current_principal(request, bearer, request.headers.get("x-api-key")))


def get_engine(request: Request) -> Engine:
    """The one engine, created in the lifespan."""
    return request.app.state.engine


def get_job_queue(request: Request) -> JobQueue:
    """The one JobQueue, created in the lifespan."""
    return request.app.state.job_queue


def get_registry(request: Request) -> ModelRegistry:
    """The user -> model registry, created in the lifespan."""
    return request.app.state.registry


def get_trainings(request: Request) -> Trainings:
    """The trainings, created in the lifespan."""
    return request.app.state.trainings


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]
TrainingsDep = Annotated[Trainings, Depends(get_trainings)]


def get_job(
    job_id: Annotated[str, Path(description="The id POST /jobs answered.")], queue: QueueDep, principal: CurrentUser
) -> Job:
    """The job with that id, if the caller may see it; 404 otherwise (another user's job is not revealed)."""
    job = queue.store.get(job_id)
    if job is None or not principal.can_access(job.user_id):
        raise NotFoundError(f"no job '{job_id}' (deleted, or removed by SD_RETENTION_DAYS)")
    return job


JobDep = Annotated[Job, Depends(get_job)]


def get_training(
    training_id: Annotated[str, Path(max_length=64, description="The id the training's POST answered.")],
    trainings: TrainingsDep,
    principal: CurrentUser,
) -> Training:
    """The training with that id, if the caller may see it; 404 otherwise (another user's is not revealed)."""
    training = trainings.get(training_id)
    if training is None or not principal.can_access(training.user_id):
        raise NotFoundError(f"no training '{training_id}' (deleted, or never made)")
    return training


TrainingDep = Annotated[Training, Depends(get_training)]


def visible_user(
    user_id: Annotated[str, Path(pattern=USER_ID_PATTERN, description="The user whose model this is.")],
    principal: CurrentUser,
) -> str:
    """The user in the path, when the caller may see it (an admin, or that user's key); 404 otherwise."""
    if not principal.can_access(user_id):
        raise NotFoundError(f"user '{user_id}' has no model")
    return user_id


VisibleUser = Annotated[str, Depends(visible_user)]


def managed_user(user_id: VisibleUser, admin: AdminUser) -> str:
    """The user in the path, when the caller is an admin (a user's own key gets 403)."""
    return user_id


ManagedUser = Annotated[str, Depends(managed_user)]
