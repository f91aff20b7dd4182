"""Which engine SD_ENGINE builds, and what it says when the Ray extra is missing."""

import sys

import pytest

from config import Settings
from sd_server.app import configured_engine
from sd_server.errors import ServiceUnavailableError


def test_sd_engine_ray_without_the_ray_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sd_server.engine.ray_engine", None)  # as if Ray were not installed

    with pytest.raises(ServiceUnavailableError, match=r"pip install -r requirements-ray.txt \(./start.sh --ray installs it\)"):
        configured_engine(Settings(_env_file=None, engine="ray"))


def test_sd_engine_accepts_only_local_or_ray():
    with pytest.raises(ValueError, match="engine"):
        Settings(_env_file=None, engine="celery")


def test_ray_settings_read_autoscaling_as_json(monkeypatch):
    monkeypatch.setenv("SD_RAY_AUTOSCALING", '{"min_replicas": 1, "max_replicas": 8}')
    monkeypatch.setenv("SD_RAY_REPLICAS", "3")

    settings = Settings(_env_file=None)

    assert settings.ray_autoscaling == {"min_replicas": 1, "max_replicas": 8} and settings.ray_replicas == 3
