"""Browser sessions: an API key exchanged for an HttpOnly cookie (which EventSource and <img> send by themselves),
who the browser is signed in as, and signing out."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response

from schemas import SessionRequest, SessionResponse
from sd_server.api.dependencies import CurrentUser, identify, services_of, session_of
from sd_server.api.errors import error_responses
from sd_server.errors import UnauthorizedError
from sd_server.security.keys import Principal
from sd_server.security.sessions import SESSION_COOKIE, Session

session_router = APIRouter(prefix="/session", tags=["session"])


def session_response(principal: Principal, session: Session | None) -> SessionResponse:
    """Who the session acts as (open mode: the open-access principal, which no key stands behind), and the CSRF token
    its changes must send."""
    return SessionResponse(
        user_id=principal.user_id,
        role=principal.role,
        open=principal.key_id is None,
        csrf_token=session.csrf_token if session else None,
        expires_at=session.expires_at if session else None,
    )


def cookie_attributes(request: Request) -> dict[str, Any]:
    """The session cookie's attributes, the same when it is set and when it is forgotten: HttpOnly, SameSite per
    SD_SESSION_SAMESITE, Secure over HTTPS and with SameSite=None (browsers drop such a cookie otherwise)."""
    samesite = services_of(request).settings.session_samesite
    return {"httponly": True, "samesite": samesite, "secure": request.url.scheme == "https" or samesite == "none", "path": "/"}


@session_router.post("", responses=error_responses(UnauthorizedError))
async def sign_in(body: SessionRequest, request: Request, response: Response) -> SessionResponse:
    """Exchange an API key for a session cookie (HttpOnly, SameSite per SD_SESSION_SAMESITE, Strict by default; Secure
    over HTTPS and with SameSite=None; lasts SD_SESSION_TTL_S). Send `csrf_token` as the X-CSRF-Token header with every POST, PUT and DELETE the cookie signs.
    In open mode (no key needed) nothing is set."""
    principal = await asyncio.to_thread(identify, request, body.api_key)  # a key is given: a principal, or 401
    if principal is None:
        raise UnauthorizedError("invalid API key")
    if principal.key_id is None:
        return session_response(principal, None)
    sessions = services_of(request).sessions
    token, session = await asyncio.to_thread(sessions.issue, principal.key_id)
    response.set_cookie(SESSION_COOKIE, token, max_age=sessions.ttl_s, **cookie_attributes(request))
    return session_response(principal, session)


@session_router.get("", responses=error_responses(UnauthorizedError))
async def read_session(principal: CurrentUser, request: Request) -> SessionResponse:
    """Who this browser (or key) acts as; with a session cookie, also its CSRF token (a reloaded page reads it here)."""
    return session_response(principal, await asyncio.to_thread(session_of, request))


def end_session(request: Request) -> None:
    """End the live session of the request's cookie, if it has one (blocking: the database)."""
    if (session := session_of(request)) is not None:
        services_of(request).sessions.end(session)


@session_router.delete("", status_code=204)
async def sign_out(request: Request) -> Response:
    """End the cookie's session (at once, on every replica: the same cookie is refused from now on) and forget the
    cookie. Without a live session there is nothing to end, and the answer is the same."""
    await asyncio.to_thread(end_session, request)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, **cookie_attributes(request))
    return response
