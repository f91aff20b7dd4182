"""Schemathesis over the OpenAPI schema, auth on: no 500s, and every response matches its own schema."""

import httpx
import hypothesis
import schemathesis
from helpers import poll
from schemathesis.specs.openapi.checks import positive_data_acceptance

ADMIN_KEY = "fuzz-admin-key-0123456789abcdef0123"
FUZZ_SETTINGS = hypothesis.settings(
    max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), database=None
)


def test_every_operation_has_no_server_errors_and_keeps_its_schema(settings, live_server_factory):
    settings.admin_key = ADMIN_KEY
    settings.max_pixel_steps = 256 * 256 * 2 * 2  # fuzzed generations stay tiny; bigger ones get 422
    settings.preload_default_model = True
    url = live_server_factory(settings)
    # A 503 before the default model has loaded is right, but not fuzzed.
    poll(lambda: httpx.get(f"{url}/health/ready").status_code, lambda status: status == 200, "readiness")
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:

        @FUZZ_SETTINGS
        @hypothesis.given(case=operation.as_strategy())
        def call_and_validate(case) -> None:
            # Schema-valid jobs over SD_MAX_PIXEL_STEPS get 422 by design, so "valid data is accepted" is left out.
            case.call_and_validate(
                headers={"Authorization": f"Bearer {ADMIN_KEY}"}, excluded_checks=[positive_data_acceptance], timeout=60
            )

        call_and_validate()
    assert len(operations) >= 17
