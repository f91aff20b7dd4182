"""The one place where the service's errors become HTTP answers: the handler of ServiceError, the catch-all for
anything else, and the OpenAPI error responses, all from the classes in ``sd_server.errors``."""

import logging
import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas import ErrorResponse
from sd_server.errors import BadRequestError, ClientDisconnectedError, InvalidFieldError, ServiceError
from sd_server.observability.logging import request_id_var
from sd_server.observability.middleware import send_json

logger = logging.getLogger(__name__)


def error_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the errors a route may answer with, one entry per status. 422 is left to FastAPI,
    which documents its validation error shape, the shape InvalidFieldError answers in too."""
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        if error.status_code == 422:
            continue
        entry = responses.setdefault(error.status_code, {"model": ErrorResponse, "description": error.description})
        if error.description not in entry["description"]:
            entry["description"] += " " + error.description
    return responses


def error_response(error: ServiceError) -> Response:
    """The answer to ``error``: its status and headers, ``{"detail": message}`` (for an invalid field, FastAPI's
    validation error shape at the field's location)."""
    if isinstance(error, ClientDisconnectedError):
        return Response(status_code=error.status_code)
    if isinstance(error, InvalidFieldError):
        detail = [{"type": "value_error", "loc": list(error.location), "msg": error.message, "input": None}]
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)
    return JSONResponse({"detail": error.message}, status_code=error.status_code, headers=error.headers)


def body_validation_error(error: ValidationError, names: dict[str, str] | None = None) -> RequestValidationError:
    """A body a route validated itself, refused as FastAPI refuses the bodies it validates: each field under
    ``body``, renamed by ``names`` (our field -> the name the client sent)."""
    names = names or {}
    return RequestValidationError(
        [{**detail, "loc": ("body", *(names.get(str(part), part) for part in detail["loc"]))} for detail in error.errors(include_url=False)]
    )


async def handle_service_error(request: Request, error: ServiceError) -> Response:
    """Exception handler: log the error (with its internal detail), answer with ``error_response``."""
    detail = f" ({error.detail})" if error.detail else ""
    level = logging.INFO if error.status_code < 500 else logging.WARNING
    logger.log(level, "%s %s -> %d: %s%s", request.method, request.url.path, error.status_code, error.message, detail)
    return error_response(error)


async def handle_validation_error(request: Request, error: RequestValidationError) -> Response:
    """Exception handler for FastAPI's validation errors: 400 for a body that is not JSON at all; else 422 naming
    each field, the values echoed back made printable (NaN, infinities and lone surrogates cannot go out as JSON)."""
    errors = error.errors()
    unparseable = next((detail for detail in errors if detail.get("type") == "json_invalid"), None)
    if unparseable is not None:
        return await handle_service_error(request, BadRequestError(f"the body is not valid JSON: {printable(unparseable.get('ctx', {}).get('error', ''))}"))
    return JSONResponse({"detail": printable(jsonable_encoder(errors))}, status_code=422)


def printable(value: Any) -> Any:
    """``value`` with every float that JSON cannot hold as its name, and every string as valid UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(key): printable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable(item) for item in value]
    return value


def internal_error_message() -> str:
    """What a client learns of an unexpected failure: where to look it up."""
    return f"internal error; the server log has the details (request id {request_id_var.get() or '-'})"


class UnexpectedErrorMiddleware:
    """Turns an exception that no handler took into a JSON 500 naming the request id (the traceback goes to the
    log). It sits inside the CORS middleware, so a browser can read the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if started:
                raise  # the answer is under way: nothing to replace it with
            await send_json(send, 500, {"detail": internal_error_message()})
