"""The real server in a subprocess, driven by the smoke client; and the Postman collection's coverage."""

import json
import re
import subprocess
import sys

import pytest

from helpers import DEADLINE_S, PROJECT_DIR, main_server
from sd_server.app import create_app


@pytest.fixture
def server_process(models_dir, tmp_path):
    """`python main.py` serving the demo model on a free port, as start.sh runs it; yields its URL."""
    with main_server({"SD_DEFAULT_MODEL": "demo", "SD_MODELS_DIR": str(models_dir), "SD_OUTPUT_DIR": str(tmp_path / "output")}) as url:
        yield url


def test_smoke_client_runs_against_the_real_server_and_writes_pngs(server_process, tmp_path):
    out = tmp_path / "test_output"

    result = subprocess.run(
        [sys.executable, "test_api.py", "--url", server_process, "--out", str(out), "--steps", "2", "--size", "256"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "all endpoints answered as expected" in result.stdout
    written = sorted(path.name for path in out.glob("*.png"))
    assert written == [
        "a1111_img2img.png", "generate_image_seed7.png", "generate_seed42.png", "generate_seed43.png", "img2img.png", "inpainted.png",
        "job_seed9.png", "training_sample.png",
    ]  # fmt: skip
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in out.glob("*.png"))


def without_variables(path: str) -> str:
    """The path with each variable (OpenAPI's {job_id}, Postman's {{jobId}}) as {}."""
    return re.sub(r"\{\{?\w+\}?\}", "{}", path)


def test_every_route_in_the_openapi_schema_is_in_the_postman_collection():
    collection = json.loads((PROJECT_DIR / "postman_collection.json").read_text())
    requests = {
        (item["request"]["method"], without_variables("/" + "/".join(item["request"]["url"]["path"])))
        for folder in collection["item"]
        for item in folder["item"]
    }

    routes = {
        (method.upper(), without_variables(path)) for path, methods in create_app().openapi()["paths"].items() for method in methods
    }

    assert routes - requests == set()
