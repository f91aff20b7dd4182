"""Shared fixtures: the tiny demo pipeline saved to disk, settings pointing at it, and app clients."""

import base64
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub; a hub id fails fast instead of hanging

import model_service  # noqa: E402
from config import Settings  # noqa: E402
from demo_model import save_demo_lora, save_demo_model  # noqa: E402
from main import create_app  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with tiny SD1.5-shaped pipelines, `demo`, `demo2`, `demo3` (seeds 0, 1, 3) and `demo-dreambooth`
    (demo's VAE and text encoder, its own UNet), and two LoRAs for them, `loras/alice` and `loras/bob`."""
    folder = tmp_path_factory.mktemp("models")
    save_demo_model(folder / "demo", seed=0)
    save_demo_model(folder / "demo2", seed=1)
    save_demo_model(folder / "demo3", seed=3)
    save_demo_model(folder / "demo-dreambooth", seed=0, unet_seed=5)
    save_demo_lora(folder / "loras" / "alice.safetensors", seed=1)
    save_demo_lora(folder / "loras" / "bob.safetensors", seed=2)
    return folder


POSTGRES_URL = os.environ.get("SD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def empty_postgres_database() -> str:
    """The test PostgreSQL database, emptied; skips the test when no server answers."""
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()
    except sqlalchemy.exc.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set SD_TEST_POSTGRES_URL): {error.orig}")
    return POSTGRES_URL


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite in the test's folder; modules that test persistence override this with both databases."""
    return f"sqlite:///{tmp_path / 'data' / 'sd-api.db'}"


@pytest.fixture
def settings(models_dir: Path, tmp_path: Path, database_url: str) -> Settings:
    """Settings for one test: `default` and `alice` on demo, `bob` on demo2, output in a fresh folder."""
    return Settings(
        _env_file=None,
        default_model="demo",
        user_models={"alice": "demo", "bob": "demo2"},
        models_dir=models_dir,
        output_dir=tmp_path / "output",
        data_dir=tmp_path / "data",
        database_url=database_url,
        cors_origins=["http://localhost:3000"],
        preload_default_model=False,  # tests count loads; readiness has its own tests
        rate_limit=None,  # tests poll fast; the rate limit has its own tests
        max_active_jobs_per_user=64,  # one test queues 20 jobs; the cap has its own test
        webhook_allow_private=True,  # local webhook receivers; SSRF refusals have their own tests
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of the app, its lifespan (and so its model service) running."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def live_server_factory() -> Iterator[Callable[[Settings], str]]:
    """Starts the app with given settings under a real uvicorn on a free port in this process; returns its URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def live_server(settings: Settings, live_server_factory: Callable[[Settings], str]) -> str:
    """The app served by a real uvicorn on a free port in this process; its base URL."""
    return live_server_factory(settings)


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the source of every real `from_pretrained` call the model service makes."""
    calls: list[str] = []
    original = model_service.StableDiffusionPipeline.from_pretrained

    def counting_from_pretrained(source, **options):
        calls.append(str(source))
        return original(source, **options)

    monkeypatch.setattr(model_service.StableDiffusionPipeline, "from_pretrained", counting_from_pretrained)
    return calls


@pytest.fixture
def small_request() -> Callable[..., dict]:
    """A request body that runs fast on the tiny pipeline; keyword arguments override its fields."""

    def make(**fields) -> dict:
        return {"prompt": "a photo of sks person", "num_inference_steps": 2, "width": 256, "height": 256, "seed": 1, **fields}

    return make


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pixels(image_base64: str) -> np.ndarray:
    """The RGB pixels of a base64 PNG, as signed integers (so differences do not wrap)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_base64))).convert("RGB")).astype(np.int16)


@pytest.fixture(params=["sqlite", "postgresql"])
def both_databases(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that uses this runs twice: on SQLite, and on PostgreSQL when a server is reachable."""
    if request.param == "postgresql":
        return empty_postgres_database()
    return f"sqlite:///{tmp_path / 'data' / 'sd-api.db'}"
