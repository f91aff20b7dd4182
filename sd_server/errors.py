"""The service's errors: each class carries its HTTP status, what it means (for the OpenAPI schema), and a
message for the client. Internal detail (paths, SQL, exception text) goes in ``detail``, which is logged with the
request id and never sent. Job errors are the same classes: a job records the message and the status."""

from typing import ClassVar


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 300 characters (for logs and details, not for clients)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def summary(error: BaseException) -> str:
    """An error's class and first line, for logs and the admin's view of /health."""
    return f"{type(error).__name__}: {first_line(error)}"


class ServiceError(Exception):
    """An error answered with ``status_code`` and ``{"detail": message}``."""

    status_code: ClassVar[int] = 500
    description: ClassVar[str] = "An unexpected error; the detail carries the request id to look up in the log."

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


class BadRequestError(ServiceError):
    """A body that cannot be parsed at all (not JSON where JSON is expected, a broken multipart form)."""

    status_code = 400
    description = "The body cannot be parsed: not valid JSON, or a broken multipart form."


class UnauthorizedError(ServiceError):
    """No API key, or one that is not valid, where keys are required."""

    status_code = 401
    description = "No API key, or an invalid one (when keys are required)."

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ServiceError):
    """The key is valid but lacks the right."""

    status_code = 403
    description = "The key lacks the right: not an admin key, or it acts as another user."


class NotFoundError(ServiceError):
    """No such thing, or one the caller may not see (another user's is never revealed)."""

    status_code = 404
    description = "No such resource (another user's answers the same)."


class UnknownUserError(NotFoundError):
    """The user has no model."""


class ConflictError(ServiceError):
    """The request conflicts with the state of what it names."""

    status_code = 409
    description = "The state forbids it: the job has ended or was cancelled, the Idempotency-Key was used for another body, or it is the default user."


class JobFinishedError(ConflictError):
    """The job has already ended and cannot be cancelled."""


class IdempotencyConflictError(ConflictError):
    """An Idempotency-Key was reused with another body."""


class DefaultUserError(ConflictError):
    """The default user's model cannot be removed, only replaced."""


class PayloadTooLargeError(ServiceError):
    """The request body is over its cap (answered by the body size middleware before any route runs)."""

    status_code = 413
    description = "The request body is over SD_MAX_BODY_BYTES (SD_MAX_UPLOAD_BYTES for LoRA uploads, SD_MAX_TRAINING_UPLOAD_BYTES for trainings)."


class InvalidFieldError(ServiceError):
    """A field that passed the schema but not the service's checks: answered like FastAPI's validation errors,
    at ``location`` (e.g. ``("body", "webhook_url")``)."""

    status_code = 422
    description = "A field is invalid; `detail[].loc` names it."
    default_location: ClassVar[tuple[str, ...]] = ("body",)

    def __init__(self, message: str, *, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.location = (*self.default_location, *([field] if field else []))


class InvalidSourceError(InvalidFieldError):
    """A model source that is not allowed or does not exist."""


class JobTooLargeError(InvalidFieldError):
    """width x height x steps x images is past SD_MAX_PIXEL_STEPS."""


class UnsafeWebhookError(InvalidFieldError):
    """The webhook URL is not http(s), or its host is private, loopback or link-local."""

    default_location = ("body", "webhook_url")


class InvalidAdapterError(InvalidFieldError):
    """A LoRA file that does not load onto its base checkpoint."""

    default_location = ("body", "file")


class InvalidPhotoError(InvalidFieldError):
    """An uploaded training photo that is not an image, is too small or too large; the message names the file."""

    def __init__(self, message: str, *, field: str = "images", detail: str | None = None) -> None:
        super().__init__(message, field=field, detail=detail)


class TooManyRequestsError(ServiceError):
    """Come back later: answered with Retry-After."""

    status_code = 429
    description = "Rate limit, job cap or full queue; retry after Retry-After seconds."

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFullError(TooManyRequestsError):
    """SD_MAX_QUEUE jobs are waiting."""


class QuotaExceededError(TooManyRequestsError):
    """A rate limit or the per-user job cap was reached."""


class TrainingLimitError(TooManyRequestsError):
    """The user already has a training running (one at a time)."""


class TrainingFailedError(ServiceError):
    """A training failed for a reason of its own: its loss diverged, or the device failed in it."""

    description = "The training failed; the message says why and what to change."


class GenerationFailedError(ServiceError):
    """The pipeline failed for a reason of its own."""

    description = "The pipeline failed; the detail carries the request id to look up in the log."


class StorageError(ServiceError):
    """An image could not be written, read or deleted; the message names the setting to check."""

    description = "An image could not be stored; the detail names the setting to check."


class ServiceUnavailableError(ServiceError):
    """The service cannot do it now, and says what would change that."""

    status_code = 503
    description = "The model could not be loaded, the device ran out of memory, or the server is shutting down."


class DatabaseUnavailableError(ServiceUnavailableError):
    """The database did not take a write or a read within SD_DATABASE_RETRY_S of retries."""


class DeviceLostError(ServiceUnavailableError):
    """The device failed in a way that poisons it for this process (a CUDA illegal memory access, say): the
    process stops for its supervisor to restart it, and the jobs it held run again after the restart."""


class ModelLoadError(ServiceUnavailableError):
    """A model could not be loaded; not cached, so the next request tries again."""


class DeviceOutOfMemoryError(ServiceUnavailableError):
    """The device ran out of memory during a generation."""


class JobTimeoutError(ServiceError):
    """The job did not finish within SD_JOB_TIMEOUT_S of its submission."""

    status_code = 504
    description = "The job did not finish within SD_JOB_TIMEOUT_S."


class JobFailedError(ServiceError):
    """A job that ended failed, answered with the status and message it recorded (a synchronous request's answer)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code  # type: ignore[misc]  # the recorded error's own status


class ClientDisconnectedError(ServiceError):
    """The client of a synchronous request went away, so its job was cancelled; nobody reads the answer."""

    status_code = 499


class ConfigurationError(Exception):
    """A setting the service cannot work with (a signing key that is not its certificate's, say): it does not start,
    and the message names the setting."""
