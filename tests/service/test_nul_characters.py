"""A NUL character, which PostgreSQL refuses in text, is refused with a 422 naming where it was, on every route that
takes a path parameter, a query parameter or text in its body, on SQLite and on PostgreSQL alike."""

import pytest

from helpers import png_bytes


@pytest.fixture
def database_url(both_databases: str) -> str:
    """Every test here runs on SQLite, and on PostgreSQL when a server answers."""
    return both_databases


def field_of(response) -> list:
    """Where a 422 says the problem is."""
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/jobs", {"prompt": "a\u0000cat"}, "prompt"),
        ("POST", "/generate", {"prompt": "a cat", "negative_prompt": "x\u0000"}, "negative_prompt"),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "a\u0000cat"}, "prompt"),
        ("POST", "/jobs", {"prompt": "a cat", "styles": ["a\u0000b"]}, "styles"),
        ("PUT", "/styles/film", {"prompt": "{prompt}, film\u0000grain"}, "prompt"),
        ("PUT", "/users/carol/model", {"kind": "checkpoint", "source": "demo\u0000"}, "source"),
    ],
)
def test_a_nul_character_in_body_text_is_422_naming_the_field(client, method, path, body, field):
    location = field_of(client.request(method, path, json=body))

    assert location[0] == "body" and field in location


def test_a_nul_character_in_a_training_caption_is_422(client, settings):
    settings.training_min_photo_side = 64
    photos = [("images", (f"{index}.png", png_bytes(index, 64), "image/png")) for index in range(3)]

    response = client.post("/users/alice/trainings", files=photos, data={"caption": "{trigger}\u0000", "resolution": "64"})

    assert field_of(response) == ["body", "caption"]


def operations(client) -> list[tuple[str, str, dict]]:
    """(method, path template, operation) for every operation in the OpenAPI schema."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path, operation) for path, methods in paths.items() for method, operation in methods.items()]


def parameters(operation: dict, location: str) -> list[str]:
    """The names of an operation's parameters in ``location`` (path or query)."""
    return [parameter["name"] for parameter in operation.get("parameters", []) if parameter["in"] == location]


def test_a_nul_character_in_any_path_parameter_is_422_naming_it(client):
    checked = []
    for method, template, operation in operations(client):
        names = parameters(operation, "path")
        if not names:
            continue
        path = template.format(**dict.fromkeys(names, "x%00y"))
        response = client.request(method, path)
        assert response.status_code == 422, f"{method} {path}: {response.status_code} {response.text}"
        assert response.json()["detail"][0]["loc"][0] == "path", f"{method} {path}: {response.text}"
        checked.append(f"{method} {template}")

    assert {"GET /jobs/{job_id}", "DELETE /trainings/{training_id}", "DELETE /keys/{key_id}", "PUT /styles/{name}"} <= set(checked)


def test_a_nul_character_in_any_query_parameter_is_422_naming_it(client):
    checked = []
    for method, path, operation in operations(client):
        if method != "GET" or parameters(operation, "path"):
            continue
        for name in parameters(operation, "query"):
            assert field_of(client.get(path, params={name: "x\u0000y"})) == ["query", name], f"GET {path}?{name}"
            checked.append(f"{path}?{name}")

    assert {"/jobs?user_id", "/jobs?cursor", "/trainings?user_id"} <= set(checked)
