"""Log lines that carry the id of the request they belong to, as text or JSON."""

import contextvars
import json
import logging

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


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


def configure_logging(log_format: str) -> None:
    """Log to stderr in text or JSON, every line with its request id (replaces the handler this set before)."""
    handler = logging.StreamHandler()
    handler.set_name("sd-api")
    handler.addFilter(RequestIdFilter())
    text = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text))
    root = logging.getLogger()
    root.handlers = [existing for existing in root.handlers if existing.get_name() != "sd-api"] + [handler]
    root.setLevel(logging.INFO)
