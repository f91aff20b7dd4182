"""Invalid requests answer 422 with a body that names the field."""

import pytest

INVALID_FIELDS = [
    ("prompt", ""),
    ("prompt", "   \n\t"),
    ("prompt", "x" * 2001),
    ("prompt", None),
    ("negative_prompt", "x" * 2001),
    ("user_id", "../etc/passwd"),
    ("user_id", "a" * 65),
    ("user_id", ""),
    ("num_inference_steps", 0),
    ("num_inference_steps", 151),
    ("guidance_scale", 0.5),
    ("guidance_scale", 30.5),
    ("width", 255),
    ("width", 2056),
    ("width", 300),
    ("height", 56),
    ("height", 516),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", "abc"),
    ("num_images", 0),
    ("num_images", 5),
    ("scheduler", "k_lms_turbo"),
]


@pytest.mark.parametrize(("field", "value"), INVALID_FIELDS)
def test_invalid_field_is_rejected_with_422_naming_it(client, small_request, field, value):
    response = client.post("/generate", json=small_request(**{field: value}))

    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["body", field]]


def test_missing_prompt_is_rejected_with_422_naming_it(client):
    response = client.post("/generate", json={"seed": 1})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert response.json()["detail"][0]["type"] == "missing"


def test_unknown_field_is_rejected_with_422_naming_it(client, small_request):
    response = client.post("/generate", json=small_request(sampler="euler"))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "sampler"]
    assert response.json()["detail"][0]["type"] == "extra_forbidden"


def test_body_that_is_not_json_is_rejected_with_400(client):
    response = client.post("/generate", content=b"prompt=cat", headers={"content-type": "application/json"})

    assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]


def test_generate_image_rejects_more_than_one_image_with_422(client, small_request):
    response = client.post("/generate/image", json=small_request(num_images=2))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "num_images"]
    assert "/generate" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("route", ["/generate", "/generate/image"])
def test_validation_runs_before_any_model_is_loaded(client, small_request, load_calls, route):
    client.post(route, json=small_request(width=300))

    assert load_calls == []
