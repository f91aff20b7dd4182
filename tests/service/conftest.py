"""The service tier: the whole app and its queue on a fake engine, through TestClient; no torch."""

import threading
from collections.abc import Callable

import pytest

from config import Settings
from fake_fixtures import engine, models_dir  # noqa: F401  (fixtures)
from fakes import FakeEngine
from sd_server.app import create_app


@pytest.fixture
def app_factory(engine: FakeEngine) -> Callable[[Settings], object]:  # noqa: F811
    """Builds the app on the test's fake engine."""
    return lambda settings: create_app(settings, engine_factory=lambda _: engine)


@pytest.fixture
def gated(engine: FakeEngine) -> threading.Semaphore:  # noqa: F811
    """Every denoising step waits for a permit: ``gated.release(n)`` lets n steps run."""
    engine.step_gate = threading.Semaphore(0)
    return engine.step_gate
