"""Log lines that carry the id of the request they belong to, as text or JSON."""

import contextvars
import json
import logging

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
PROBE_PATHS = frozenset({"/health", "/health/ready", "/metrics"})  # health checks and scrapes: open while stopping, not logged


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record (one given with ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (SD_LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ProbeFilter(logging.Filter):
    """Leaves out of uvicorn's access log the probes that succeed: a load balancer's health checks and Prometheus'
    scrapes, many a second, would bury the requests, and writing them costs the server's event loop more than the
    probes themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) != 5:  # uvicorn's access record: client, method, path, HTTP version, status
            return True
        _, method, path, _, status = args
        return not (method in ("GET", "HEAD") and str(path).split("?")[0] in PROBE_PATHS and isinstance(status, int) and status < 400)


def configure_logging(log_format: str, log_probes: bool) -> None:
    """Log to stderr in text or JSON, every line with its request id (replaces the handler this set before); the
    access log leaves out successful probes unless ``log_probes``."""
    handler = logging.StreamHandler()
    handler.set_name("sd-api")
    handler.addFilter(RequestIdFilter())
    text = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text))
    root = logging.getLogger()
    root.handlers = [existing for existing in root.handlers if existing.get_name() != "sd-api"] + [handler]
    root.setLevel(logging.INFO)
    access = logging.getLogger("uvicorn.access")
    access.filters = [existing for existing in access.filters if not isinstance(existing, ProbeFilter)]
    if not log_probes:
        access.addFilter(ProbeFilter())
