"""FastAPI dependencies: who the request acts as, the service objects created in the lifespan, and the resources
a route names in its path, loaded once with their owner checked."""

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from sd_server.api.work_pools import WorkPool
from sd_server.domain.jobs import Job
from sd_server.domain.models import USER_ID_PATTERN
from sd_server.domain.trainings import Training
from sd_server.engine.interface import Engine
from sd_server.errors import ForbiddenError, NotFoundError, UnauthorizedError
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.trainings import Trainings
from sd_server.registry import ModelRegistry
from sd_server.security.keys import OPEN_ACCESS, Principal
from sd_server.security.sessions import CSRF_HEADER, SESSION_COOKIE, Session, same_secret
from sd_server.styles import StyleBook

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, as a header of its own")
basic_scheme = HTTPBasic(auto_error=False, description="HTTP basic auth with the API key as the password (A1111 clients)")


def refuse_nul_characters(request: Request) -> None:
    """422 naming the path or query parameter that holds a NUL character (%00): no id, name or filter has one, and
    a database cannot store one (PostgreSQL refuses it). Every route depends on this first."""
    places = [("path", name, value) for name, value in request.path_params.items()]
    places += [("query", name, name + value) for name, value in request.query_params.multi_items()]  # in a name too
    for location, name, value in places:
        if "\x00" in str(value):
            raise RequestValidationError(
                [{"type": "value_error", "loc": (location, name), "msg": "must not contain a NUL character (%00)", "input": None}]
            )


def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_scheme)],
    basic: Annotated[HTTPBasicCredentials | None, Depends(basic_scheme)],
) -> str | None:
    """The API key the request carries: X-API-Key, a bearer token, or the password of HTTP basic auth."""
    return api_key or (bearer.credentials if bearer else None) or (basic.password if basic else None)


PresentedKey = Annotated[str | None, Depends(presented_key)]


def current_principal(request: Request, key: PresentedKey) -> Principal:
    """Who the request acts as: 401 without a valid key when keys are required; counts the rate limit (reads and
    changes have budgets of their own)."""
    principal = identify(request, key)
    if principal is None:
        raise UnauthorizedError(
            "an API key is required: send Authorization: Bearer <key>, X-API-Key: <key>, or HTTP basic auth with the key "
            "as password; browsers sign in with POST /session"
        )
    reading = request.method in ("GET", "HEAD")
    request.app.state.rate_limiter.hit(principal, request.client.host if request.client else "unknown", reading)
    return principal


def identify(request: Request, key: str | None) -> Principal | None:
    """The principal of ``key``, else of the request's session cookie (everyone is the open-access admin when no
    key is required); None without either where one is required; 401 for a key that is not valid."""
    authenticator = request.app.state.authenticator
    if not authenticator.required:
        return OPEN_ACCESS
    if not key:
        return session_principal(request)
    principal = authenticator.keys.authenticate(key)
    if principal is None:
        raise UnauthorizedError("invalid API key")
    return principal


def session_of(request: Request) -> Session | None:
    """The live session of the request's cookie; None without one (blocking: it reads the database, once a request:
    authentication and the session routes share the answer)."""
    if not hasattr(request.state, "session"):
        token = request.cookies.get(SESSION_COOKIE)
        request.state.session = request.app.state.sessions.verify(token) if token else None
    return request.state.session


def session_principal(request: Request) -> Principal | None:
    """Who the session cookie acts as (None without a valid one, or once its key is revoked); 403 for a change
    (POST, PUT, DELETE) that does not send the session's CSRF token, which another site's page cannot know."""
    session = session_of(request)
    principal = request.app.state.authenticator.keys.principal(session.key_id) if session else None
    if principal is None:
        return None
    if request.method not in SAFE_METHODS and not same_secret(request.headers.get(CSRF_HEADER, ""), session.csrf_token):
        raise ForbiddenError(f"a change signed by the session cookie must send the session's {CSRF_HEADER} header (GET /session answers it)")
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def optional_principal(request: Request, key: PresentedKey) -> Principal | None:
    """Who the request acts as, or None without a key (for routes that answer everyone, and admins with more)."""
    return identify(request, key)


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
        require_admin(current_principal(request, request.headers.get("x-api-key") or (bearer.credentials if bearer else None)))


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


def get_styles(request: Request) -> StyleBook:
    """The style presets, created in the lifespan."""
    return request.app.state.styles


def get_decoding(request: Request) -> WorkPool:
    """The pool that decodes uploaded pictures and zips (SD_DECODE_THREADS), created in the lifespan."""
    return request.app.state.decoding


def get_lookups(request: Request) -> WorkPool:
    """The pool that resolves webhook hosts, created in the lifespan."""
    return request.app.state.lookups


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]
TrainingsDep = Annotated[Trainings, Depends(get_trainings)]
StylesDep = Annotated[StyleBook, Depends(get_styles)]
DecodingDep = Annotated[WorkPool, Depends(get_decoding)]
LookupsDep = Annotated[WorkPool, Depends(get_lookups)]


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
