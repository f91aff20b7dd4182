"""ASGI middleware: request ids, HTTP metrics, refusing work while shutting down, and the body size cap."""

import json
import re
import time
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd_server.observability.logging import PROBE_PATHS, request_id_var
from sd_server.observability.metrics import Metrics


async def send_json(send: Send, status: int, body: dict) -> None:
    """Answer with a JSON body, outside FastAPI's routing."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


class RequestContextMiddleware:
    """Accepts or creates X-Request-ID (returned, and in every log line); counts and times requests; 503 while stopping."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = {"code": 500}
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            state = scope["app"].state
            if getattr(state, "shutting_down", False) and scope["path"] not in PROBE_PATHS:  # probes answer while stopping
                await send_json(send_with_id, 503, {"detail": "the server is shutting down; retry on another instance"})
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            request_id_var.reset(token)


@dataclass(frozen=True)
class BodyLimit:
    """A larger cap for the bodies of some paths: LoRA and photo uploads, requests that carry images."""

    paths: re.Pattern[str]
    max_bytes: int
    setting: str


class BodySizeLimitMiddleware:
    """413 for request bodies over their cap: by Content-Length, and by counting a body sent without it. The first
    of ``limits`` whose paths match sets the cap; other paths get ``max_bytes`` (SD_MAX_BODY_BYTES)."""

    def __init__(self, app: ASGIApp, max_bytes: int, limits: list[BodyLimit]) -> None:
        self.app = app
        self.max_bytes, self.limits = max_bytes, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        matched = next((rule for rule in self.limits if rule.paths.fullmatch(scope["path"])), None)
        limit, setting = (matched.max_bytes, matched.setting) if matched else (self.max_bytes, "SD_MAX_BODY_BYTES")
        message = f"request body over {limit} bytes ({setting})"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_json(send, 413, {"detail": message})
        received, refused = 0, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > limit and not refused:
                refused = True
                await send_json(send, 413, {"detail": message})
            return {"type": "http.disconnect"} if refused else message_in

        async def send_unless_refused(message_out: Message) -> None:
            if not refused:  # the app's own answer to the cut-off body goes nowhere
                await send(message_out)

        await self.app(scope, counting_receive, send_unless_refused)
