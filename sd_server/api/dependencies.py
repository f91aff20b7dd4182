"""FastAPI dependencies: who the request acts as, the service objects created in the lifespan, and the resources
a route names in its path, loaded once with their owner checked."""

import binascii
from base64 import b64decode
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from config import Settings
from sd_server.api.services import Services
from sd_server.api.work_pools import WorkPool
from sd_server.domain.jobs import Job
from sd_server.domain.models import USER_ID_PATTERN
from sd_server.domain.trainings import Training
from sd_server.engine.interface import Engine
from sd_server.errors import ForbiddenError, NotFoundError, UnauthorizedError
from sd_server.jobs.events import EventBus
from sd_server.jobs.submission import Jobs
from sd_server.jobs.trainings import Trainings
from sd_server.registry import ModelRegistry
from sd_server.security.keys import OPEN_ACCESS, Principal
from sd_server.security.sessions import CSRF_HEADER, SESSION_COOKIE, Session, same_secret
from sd_server.storage.images import ImageStorage
from sd_server.styles import StyleBook

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
T = TypeVar("T")
bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, as a header of its own")


class LenientBasic(HTTPBasic):
    """HTTP basic auth as A1111 reads it: the key is the password of ``user:key``, or the whole of credentials without
    a colon (``key``) or with an empty password (``key:``). Empty or malformed credentials are no key at all, not a
    401: Open WebUI and SillyTavern send ``Authorization: Basic `` when their auth field is empty, and open mode (as
    A1111 without --api-auth) must ignore it."""

    async def __call__(self, request: HTTPConnection) -> str | None:  # type: ignore[override]
        scheme, param = get_authorization_scheme_param(request.headers.get("Authorization"))
        if scheme.lower() != "basic":
            return None
        try:
            credentials = b64decode(param, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            return None
        username, _, password = credentials.partition(":")
        return password or username or None


basic_scheme = LenientBasic(auto_error=False, description="HTTP basic auth with the API key as the password (A1111 clients)")


async def refuse_nul_characters(request: Request) -> None:
    """422 naming the path or query parameter that holds a NUL character (%00): no id, name or filter has one, and
    a database cannot store one (PostgreSQL refuses it). Every route depends on this first."""
    places = [("path", name, value) for name, value in request.path_params.items()]
    places += [("query", name, name + value) for name, value in request.query_params.multi_items()]  # in a name too
    for location, name, value in places:
        if "\x00" in str(value):
            raise RequestValidationError(
                [{"type": "value_error", "loc": (location, name), "msg": "must not contain a NUL character (%00)", "input": None}]
            )


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_scheme)],
    basic: Annotated[str | None, Depends(basic_scheme)],
) -> str | None:
    """The API key the request carries: X-API-Key, a bearer token, or HTTP basic auth's (``LenientBasic``)."""
    return api_key or (bearer.credentials if bearer else None) or basic


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
    services_of(request).rate_limiter.hit(principal, request.client.host if request.client else "unknown", reading)
    return principal


def identify(request: Request, key: str | None) -> Principal | None:
    """The principal of ``key``, else of the request's session cookie (everyone is the open-access admin when no
    key is required); None without either where one is required; 401 for a key that is not valid."""
    authenticator = services_of(request).authenticator
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
        request.state.session = services_of(request).sessions.verify(token) if token else None
    return cast(Session | None, request.state.session)


def session_principal(request: Request) -> Principal | None:
    """Who the session cookie acts as (None without a valid one, or once its key is revoked); 403 for a change
    (POST, PUT, DELETE) that does not send the session's CSRF token, which another site's page cannot know."""
    session = session_of(request)
    principal = services_of(request).authenticator.keys.principal(session.key_id) if session else None
    if session is None or principal is None:
        return None
    if request.method not in SAFE_METHODS and not same_secret(request.headers.get(CSRF_HEADER, ""), session.csrf_token):
        raise ForbiddenError(f"a change signed by the session cookie must send the session's {CSRF_HEADER} header (GET /session answers it)")
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


async def optional_principal(request: Request, key: PresentedKey) -> Principal | None:
    """Who the request acts as, or None without a key (for routes that answer everyone, and admins with more). A
    request without credentials (a load balancer's health check) has nothing to look up, so no thread-pool hop."""
    if key or SESSION_COOKIE in request.cookies:
        return await run_in_threadpool(identify, request, key)
    return identify(request, key)


MaybeUser = Annotated[Principal | None, Depends(optional_principal)]


def admin_only(principal: Principal) -> Principal:
    """``principal``, or 403 unless the key is an admin's."""
    if not principal.is_admin:
        raise ForbiddenError("this route needs an admin key")
    return principal


async def require_admin(principal: CurrentUser) -> Principal:
    """``admin_only`` as a dependency."""
    return admin_only(principal)


AdminUser = Annotated[Principal, Depends(require_admin)]


async def metrics_access(request: Request) -> None:
    """Open, unless SD_METRICS_REQUIRE_ADMIN: then an admin key (looked up on the thread pool). Reads the headers
    itself, so that the schema shows /metrics as open, which is its default."""
    if services_of(request).settings.metrics_require_admin:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" else None
        key = request.headers.get("x-api-key") or (bearer.credentials if bearer else None)
        admin_only(await run_in_threadpool(current_principal, request, key))


def services_of(request: Request) -> Services:
    """The services the composition root built in the lifespan."""
    return cast(Services, request.app.state.services)


async def get_services(request: Request) -> Services:
    """``services_of`` as a dependency (async, as are the other dependencies that neither block nor wait: a sync one
    costs every request a hop to the thread pool and back)."""
    return services_of(request)


ServicesDep = Annotated[Services, Depends(get_services)]


def provided(pick: Callable[[Services], T]) -> Any:
    """A dependency on the one service ``pick`` takes from the Services: a route names what it uses, nothing more."""

    async def dependency(services: ServicesDep) -> T:
        return pick(services)

    return Depends(dependency)


SettingsDep = Annotated[Settings, provided(lambda services: services.settings)]
EngineDep = Annotated[Engine, provided(lambda services: services.engine)]
RegistryDep = Annotated[ModelRegistry, provided(lambda services: services.registry)]
JobsDep = Annotated[Jobs, provided(lambda services: services.jobs)]
TrainingsDep = Annotated[Trainings, provided(lambda services: services.trainings)]
StylesDep = Annotated[StyleBook, provided(lambda services: services.styles)]
StorageDep = Annotated[ImageStorage, provided(lambda services: services.storage)]
BusDep = Annotated[EventBus, provided(lambda services: services.bus)]  # SSE streams subscribe to it
DecodingDep = Annotated[WorkPool, provided(lambda services: services.decoding)]  # decodes uploads (SD_DECODE_THREADS)
LookupsDep = Annotated[WorkPool, provided(lambda services: services.lookups)]  # resolves webhook hosts


def get_job(
    job_id: Annotated[str, Path(description="The id POST /jobs answered.")], jobs: JobsDep, principal: CurrentUser
) -> Job:
    """The job with that id, if the caller may see it; 404 otherwise (another user's job is not revealed)."""
    job = jobs.get(job_id)
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


async def visible_user(
    user_id: Annotated[str, Path(pattern=USER_ID_PATTERN, description="The user whose model this is.")],
    principal: CurrentUser,
) -> str:
    """The user in the path, when the caller may see it (an admin, or that user's key); 404 otherwise."""
    if not principal.can_access(user_id):
        raise NotFoundError(f"user '{user_id}' has no model")
    return user_id


VisibleUser = Annotated[str, Depends(visible_user)]


async def managed_user(user_id: VisibleUser, admin: AdminUser) -> str:
    """The user in the path, when the caller is an admin (a user's own key gets 403)."""
    return user_id


ManagedUser = Annotated[str, Depends(managed_user)]
