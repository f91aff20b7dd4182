"""Fixtures of the tiers that run on the fake engine (unit, service): an empty models folder and the engine."""

from pathlib import Path

import pytest

from fakes import FakeEngine


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty models folder: the fake engine loads nothing from disk."""
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
def engine() -> FakeEngine:
    """The fake engine of this test."""
    return FakeEngine()
