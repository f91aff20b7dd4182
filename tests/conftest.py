"""Fixtures every tier shares: settings for one test, the databases, an app client, a live server. Nothing here
imports torch at import time: the unit and service tiers run without it (on the fake engine of tests/fakes.py)."""

import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy
import uvicorn
from fastapi.dependencies import models as fastapi_dependencies
from fastapi.testclient import TestClient

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub; a hub id fails fast instead of hanging

from config import Settings  # noqa: E402
from helpers import DEADLINE_S, POSTGRES_URL, free_port, poll  # noqa: E402
from sd_server.app import create_app  # noqa: E402

TIERS = ("unit", "service", "integration", "system")
TIER_TIMEOUTS_S = {"unit": 60, "service": 120, "integration": 600, "system": 900}


def pytest_report_header() -> str:
    """Whether this Python can import torch: `./start.sh --test` runs the unit and service tiers where it cannot."""
    blocked = any(type(finder).__name__ == "BlockTorch" for finder in sys.meta_path)
    return "torch: blocked (tests/torch_free)" if blocked else "torch: importable"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier (the folder it is in) and that tier's timeout."""
    for item in items:
        tier = next((part for part in Path(item.fspath).parts if part in TIERS), "integration")
        item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUTS_S[tier]))


@pytest.fixture(autouse=True)
def finished_apps_are_let_go() -> Iterator[None]:
    """Clear FastAPI's caches of callables after each test. They keep the last 4,096 route and dependency functions,
    and an app's are closures that hold the whole app: without this the process keeps about a hundred finished apps
    (millions of objects), and every full garbage collection of the rest of the suite scans them."""
    yield
    for cached in vars(fastapi_dependencies).values():
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with tiny SD1.5-shaped pipelines, `demo`, `demo2`, `demo3` (seeds 0, 1, 3), `demo-dreambooth`
    (demo's VAE and text encoder, its own UNet) and `demo-inpainting` (a 9-channel UNet), and two LoRAs for them,
    `loras/alice` and `loras/bob`."""
    from sd_server.demo.random_pipeline import save_random_lora, save_random_pipeline

    folder = tmp_path_factory.mktemp("models")
    save_random_pipeline(folder / "demo", seed=0)
    save_random_pipeline(folder / "demo2", seed=1)
    save_random_pipeline(folder / "demo3", seed=3)
    save_random_pipeline(folder / "demo-dreambooth", seed=0, unet_seed=5)
    save_random_pipeline(folder / "demo-inpainting", seed=0, unet_seed=7, unet_in_channels=9)
    save_random_lora(folder / "loras" / "alice.safetensors", seed=1)
    save_random_lora(folder / "loras" / "bob.safetensors", seed=2)
    return folder




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


@pytest.fixture(params=["sqlite", "postgresql"])
def both_databases(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that uses this runs twice: on SQLite, and on PostgreSQL when a server is reachable."""
    if request.param == "postgresql":
        return empty_postgres_database()
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
        rate_limit=None,  # tests poll; the rate limits have their own tests
        read_rate_limit=None,
        max_active_jobs_per_user=64,  # one test queues 20 jobs; the cap has its own test
        webhook_allow_private=True,  # local webhook receivers; SSRF refusals have their own tests
    )


@pytest.fixture
def app_factory() -> Callable[[Settings], object]:
    """Builds the app for given settings (the unit tier's version gives it the fake engine)."""
    return create_app


@pytest.fixture
def client(settings: Settings, app_factory) -> Iterator[TestClient]:
    """A client of the app, its lifespan (and so its engine) running."""
    with TestClient(app_factory(settings)) as test_client:
        yield test_client


@pytest.fixture
def live_server_factory(app_factory) -> Iterator[Callable[[Settings], str]]:
    """Starts the app with given settings under a real uvicorn on a free port in this process; returns its URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app_factory(settings), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        poll(lambda: server.started, bool, "uvicorn starting")
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture
def live_server(settings: Settings, live_server_factory: Callable[[Settings], str]) -> str:
    """The app served by a real uvicorn on a free port in this process; its base URL."""
    return live_server_factory(settings)


@pytest.fixture
def small_request() -> Callable[..., dict]:
    """A request body that runs fast on the tiny pipeline; keyword arguments override its fields."""

    def make(**fields) -> dict:
        return {"prompt": "a photo of sks person", "num_inference_steps": 2, "width": 256, "height": 256, "seed": 1, **fields}

    return make


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the source of every real `from_pretrained` call the engine makes."""
    from sd_server.engine import cache

    calls: list[str] = []
    original = cache.StableDiffusionPipeline.from_pretrained

    def counting_from_pretrained(source, **options):
        calls.append(str(source))
        return original(source, **options)

    monkeypatch.setattr(cache.StableDiffusionPipeline, "from_pretrained", counting_from_pretrained)
    return calls


@pytest.fixture
def fail_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[Exception], None]:
    """``fail_once(error)``: the next pipeline call raises ``error``; later calls run normally."""
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.__call__
    failures: list[Exception] = []

    def call(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    return failures.append


@pytest.fixture
def hold_generation(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every pipeline call waits until the returned event is set (at the latest when the test ends): a generation
    that runs exactly as long as the test wants."""
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.__call__
    release = threading.Event()
    entered = threading.Event()

    def held_call(self, *args, **kwargs):
        entered.set()
        release.wait(DEADLINE_S)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", held_call)
    release.entered = entered  # set once a pipeline call is waiting
    yield release
    release.set()
