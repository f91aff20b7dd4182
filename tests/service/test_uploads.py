"""LoRA uploads: the key and the size are checked before the body is read (raw sockets against a real server),
and the multipart form's fields are checked like any other body."""

import socket

import httpx
import pytest

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
BOUNDARY = "sdtestboundary"


@pytest.fixture
def secured_server(settings, models_dir, live_server_factory) -> str:
    """A real server that requires keys, with a `demo` base checkpoint folder for uploads to name."""
    (models_dir / "demo").mkdir()
    (models_dir / "demo" / "model_index.json").write_text("{}")
    settings.admin_key = ADMIN_KEY
    return live_server_factory(settings)


def send_headers_and_a_little(url: str, headers: dict[str, str], body_bytes: int) -> str:
    """Open a connection, send a request line and headers announcing a large body, and 64 KiB of it; the status
    line the server answers with before the rest is sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        lines = ["POST /users/bob/lora HTTP/1.1", f"Host: {host}", f"Content-Length: {body_bytes}", *(f"{k}: {v}" for k, v in headers.items())]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        connection.sendall(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.safetensors\"\r\n\r\n".encode())
        connection.sendall(b"\0" * 65536)
        return connection.recv(4096).decode(errors="replace").split("\r\n")[0]


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(secured_server, models_dir):
    status = send_headers_and_a_little(secured_server, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, 45_000_000)

    assert status.startswith("HTTP/1.1 401")
    assert not (models_dir / ".staging").exists() or list((models_dir / ".staging").iterdir()) == []


def test_an_upload_over_the_cap_is_refused_before_its_body_is_read(settings, secured_server):
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Authorization": f"Bearer {ADMIN_KEY}"}

    status = send_headers_and_a_little(secured_server, headers, settings.max_upload_bytes + 1)

    assert status.startswith("HTTP/1.1 413")


def test_an_upload_with_an_admin_key_is_checked_and_kept_under_its_hash(secured_server, models_dir):
    response = httpx.post(
        f"{secured_server}/users/bob/lora",
        files={"file": ("bob.safetensors", b"fake adapter bytes")},
        data={"scale": "0.5"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )

    assert response.status_code == 201, response.text
    model = response.json()["model"]
    assert model["scale"] == 0.5 and model["base"] == "demo" and (models_dir / model["source"]).is_file()
    assert list((models_dir / ".staging").iterdir()) == []


@pytest.mark.parametrize(
    ("files", "data", "location"),
    [({}, {"scale": "1"}, ["body", "file"]), ({"file": ("a.safetensors", b"x")}, {"scale": "nan"}, ["body", "scale"]),
     ({"file": ("a.safetensors", b"x")}, {"scale": "1", "color": "red"}, ["body", "color"])],
)  # fmt: skip
def test_an_upload_with_a_missing_or_invalid_field_answers_422_naming_it(secured_server, files, data, location):
    response = httpx.post(f"{secured_server}/users/bob/lora", files=files, data=data, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == location
