"""The access log leaves out successful probes (health checks, metrics scrapes), unless SD_LOG_PROBES asks for them;
failed probes and every other request are logged."""

import logging
from collections.abc import Iterator

import pytest

from sd_server.observability.logging import configure_logging

ACCESS = logging.getLogger("uvicorn.access")


def log_access(method: str, path: str, status: int) -> None:
    """Log a request the way uvicorn's access logger does."""
    ACCESS.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:50000", method, path, "1.1", status)


@pytest.fixture
def access_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """Captures the access log (its lines are ``access_log.messages``)."""
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    yield caplog
    configure_logging("text", log_probes=True)  # the filter off again for the tests after this one


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/metrics", "/health/ready?verbose=1"])
def test_a_successful_probe_is_left_out(access_log, path):
    configure_logging("text", log_probes=False)

    log_access("GET", path, 200)

    assert access_log.messages == []


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/health/ready", 503), ("GET", "/jobs", 200), ("POST", "/health", 405)])
def test_failed_probes_and_other_requests_are_logged(access_log, method, path, status):
    configure_logging("text", log_probes=False)

    log_access(method, path, status)

    assert access_log.messages == [f'127.0.0.1:50000 - "{method} {path} HTTP/1.1" {status}']


def test_sd_log_probes_logs_them_all(access_log):
    configure_logging("text", log_probes=True)

    log_access("GET", "/health/ready", 200)

    assert len(access_log.messages) == 1
