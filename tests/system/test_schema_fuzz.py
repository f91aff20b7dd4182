"""Schemathesis over the OpenAPI schema of a real server, auth on: every operation fuzzed on its own (100 examples
each), then sequences that follow the schema's links (create a job, read it, follow it, cancel it, delete it; create
a key, revoke it): no 500s, and every response matches its own schema."""

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from helpers import poll

ADMIN_KEY = "fuzz-admin-key-0123456789abcdef0123"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Schema-valid jobs over SD_MAX_PIXEL_STEPS get 422 by design, so "valid data is accepted" is left out.
EXCLUDED = [positive_data_acceptance]
FUZZ_SETTINGS = hypothesis.settings(
    max_examples=100, derandomize=True, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), database=None
)


@pytest.fixture
def schema(settings, live_server_factory):
    """The schema of a live server that requires keys and keeps fuzzed generations tiny."""
    settings.admin_key = ADMIN_KEY
    settings.max_pixel_steps = 256 * 256 * 2 * 2  # bigger generations get 422
    settings.preload_default_model = True
    url = live_server_factory(settings)
    # A 503 before the default model has loaded is right, but not fuzzed.
    poll(lambda: httpx.get(f"{url}/health/ready").status_code, lambda status: status == 200, "readiness")
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_operation_has_no_server_errors_and_keeps_its_schema(schema):
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:

        @FUZZ_SETTINGS
        @hypothesis.given(case=operation.as_strategy())
        def call_and_validate(case) -> None:
            case.call_and_validate(headers=HEADERS, excluded_checks=EXCLUDED, timeout=60)

        call_and_validate()
    assert len(operations) >= 17


def test_sequences_that_follow_the_schemas_links_have_no_server_errors(schema):
    class Workflow(schema.as_state_machine()):
        def get_call_kwargs(self, case) -> dict:
            return {"headers": HEADERS, "timeout": 60}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            case.validate_response(response, excluded_checks=EXCLUDED)

    Workflow.run(settings=hypothesis.settings(FUZZ_SETTINGS, stateful_step_count=6))
