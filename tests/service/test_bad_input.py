"""Bad input answers 4xx naming the field, never 500: non-finite numbers, lone surrogates, huge offsets, broken
bodies, times with any UTC offset; and a property test over every field of a generation."""

import json
from datetime import datetime, timedelta, timezone

import hypothesis
import pytest
from hypothesis import strategies as st

from helpers import wait_for

RAW_BODIES = [
    ('{"prompt": "a cat", "guidance_scale": NaN}', "guidance_scale"),
    ('{"prompt": "a cat", "guidance_scale": Infinity}', "guidance_scale"),
    ('{"prompt": "a cat", "guidance_scale": 1e309}', "guidance_scale"),
    ('{"prompt": "a cat", "height": 1e400}', "height"),
    ('{"prompt": "\\ud800"}', "prompt"),
    ('{"prompt": "a cat", "negative_prompt": "x\\udfff"}', "negative_prompt"),
]


def post_raw(client, path: str, body: str):
    """POST a body exactly as written (JSON that Python's encoder would not write)."""
    return client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(("body", "field"), RAW_BODIES)
@pytest.mark.parametrize("path", ["/generate", "/jobs"])
def test_non_finite_numbers_and_lone_surrogates_answer_422_naming_the_field(client, path, body, field):
    response = post_raw(client, path, body)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]


def test_a_lone_surrogate_in_a_model_source_answers_422(client):
    body = '{"kind": "checkpoint", "source": "a\\ud800b"}'
    response = client.put("/users/carol/model", content=body.encode(), headers={"Content-Type": "application/json"})

    assert response.status_code == 422 and response.json()["detail"][0]["loc"][0] == "body"


def test_a_body_that_is_not_json_answers_400(client):
    response = post_raw(client, "/generate", '{"prompt": "a cat",')

    assert response.status_code == 400 and response.json()["detail"].startswith("the body is not valid JSON")


@pytest.mark.parametrize("offset", [2**63, 2**31])
def test_an_offset_past_what_a_database_holds_answers_422(client, offset):
    response = client.get("/jobs", params={"offset": offset})

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "offset"]


def test_time_filters_compare_instants_whatever_the_utc_offset(client, small_request):
    job = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])
    created = datetime.fromisoformat(job["created_at"])
    in_karachi = (created - timedelta(seconds=1)).astimezone(timezone(timedelta(hours=5))).isoformat()
    later_in_karachi = (created + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=5))).isoformat()

    after = client.get("/jobs", params={"created_after": in_karachi}).json()["total"]
    before = client.get("/jobs", params={"created_before": later_in_karachi}).json()["total"]
    none_after = client.get("/jobs", params={"created_after": later_in_karachi}).json()["total"]

    assert (after, before, none_after) == (1, 1, 0)


def test_a_time_with_no_utc_equivalent_answers_422(client):
    response = client.get("/jobs", params={"created_after": "9999-12-31T23:00:00-05:00"})

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "created_after"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
FIELDS = ["prompt", "negative_prompt", "user_id", "num_inference_steps", "guidance_scale", "width", "height", "seed", "num_images", "scheduler", "webhook_url"]


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_any_json_value_in_any_field_answers_below_500(client_for_fuzz, field, value):
    body = json.dumps({"prompt": "a cat", "num_inference_steps": 1, "width": 256, "height": 256, field: value})

    response = post_raw(client_for_fuzz, "/jobs", body)

    assert response.status_code < 500, (field, value, response.text)
    if response.status_code == 422:
        json.dumps(response.json())  # the echoed values came back as valid JSON


@pytest.fixture(scope="module")
def client_for_fuzz(tmp_path_factory):
    """One app for every example of the property test (the examples only submit; the queue is made deep)."""
    from fastapi.testclient import TestClient

    from config import Settings
    from fakes import FakeEngine
    from sd_server.app import create_app

    folder = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        _env_file=None, default_model="demo", models_dir=folder, output_dir=folder / "output", data_dir=folder / "data",
        rate_limit=None, read_rate_limit=None, max_queue=100_000, max_active_jobs_per_user=100_000, webhook_allow_private=False,
    )  # fmt: skip
    with TestClient(create_app(settings, engine_factory=lambda _: FakeEngine())) as client:
        yield client
