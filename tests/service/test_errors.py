"""One error hierarchy: each class carries its status; one handler answers it; the OpenAPI schema documents it;
anything else is a 500 that names the request id, readable by a browser (CORS), with the detail only in the log."""

import asyncio

import pytest

from sd_server.api.errors import UnexpectedErrorMiddleware, error_responses
from sd_server.errors import (
    ConflictError,
    InvalidFieldError,
    NotFoundError,
    QueueFullError,
    ServiceError,
    ServiceUnavailableError,
)


def all_subclasses(cls: type) -> list[type]:
    """Every class below ``cls``."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *all_subclasses(direct))]


def test_every_service_error_has_an_http_status_and_a_description():
    for error in all_subclasses(ServiceError):
        assert 400 <= error.status_code < 600, error
        assert error.description, error


def test_openapi_error_responses_come_from_the_error_classes(client):
    schema = client.get("/openapi.json").json()
    job_responses = schema["paths"]["/jobs/{job_id}/cancel"]["post"]["responses"]

    assert job_responses["404"]["description"] == NotFoundError.description
    assert job_responses["409"]["description"] == ConflictError.description
    assert job_responses["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert schema["paths"]["/health/ready"]["get"]["responses"]["503"]["description"] == ServiceUnavailableError.description


def test_error_responses_merge_classes_of_one_status_and_leave_422_to_fastapi():
    responses = error_responses(QueueFullError, NotFoundError, InvalidFieldError)

    assert set(responses) == {429, 404}


def test_a_too_many_requests_error_carries_retry_after():
    assert QueueFullError("full", retry_after_s=7).headers == {"Retry-After": "7"}


def test_an_unexpected_failure_answers_500_with_the_request_id_and_cors_headers(client, engine, monkeypatch, caplog):
    def broken_report():
        raise RuntimeError("lost /srv/secret/state")

    monkeypatch.setattr(engine, "report", broken_report)

    response = client.get("/health", headers={"Origin": "http://localhost:3000", "X-Request-ID": "trace-500"})

    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; the server log has the details (request id trace-500)"}
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert response.headers["x-request-id"] == "trace-500"
    assert "/srv/secret" in caplog.text and "/srv/secret" not in response.text


@pytest.mark.parametrize(
    ("body", "location"),
    [({"kind": "checkpoint", "source": "../outside"}, ["body", "source"]), ({"kind": "lora", "base": "nope", "source": "x"}, ["body", "base"])],
)
def test_an_invalid_field_answers_422_in_fastapis_shape_naming_the_field(client, body, location):
    response = client.put("/users/carol/model", json=body)

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == location
    assert "/" + str(client.app.state.settings.models_dir).strip("/") not in response.text  # no server paths


def test_the_unexpected_error_middleware_lets_a_started_answer_fail_as_it_is():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-stream")

    async def noop_receive():
        return {"type": "http.request"}

    sent = []

    async def send(message):
        sent.append(message)

    with pytest.raises(RuntimeError):
        asyncio.run(UnexpectedErrorMiddleware(app)({"type": "http", "method": "GET", "path": "/"}, noop_receive, send))
    assert [message["status"] for message in sent] == [200]


def test_a_service_error_answers_with_its_status_and_message(client):
    response = client.get("/jobs/no-such-job")

    assert response.status_code == 404 and response.json() == {"detail": "no job 'no-such-job' (deleted, or removed by SD_RETENTION_DAYS)"}
