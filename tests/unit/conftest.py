"""The unit tier: the app and its queue on a fake engine, no torch; each test runs in milliseconds."""

from collections.abc import Callable
from pathlib import Path

import pytest

from config import Settings
from fakes import FakeEngine
from sd_server.app import create_app


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty models folder: the fake engine loads nothing from disk."""
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
def engine() -> FakeEngine:
    """The fake engine the app of this test runs on."""
    return FakeEngine()


@pytest.fixture
def app_factory(engine: FakeEngine) -> Callable[[Settings], object]:
    """Builds the app on the test's fake engine."""
    return lambda settings: create_app(settings, engine_factory=lambda _: engine)
