"""Settings from the environment, the user -> model mapping, and where model sources lie."""

import json

import pytest

from config import Settings
from sd_server.domain.generation import sampler_label
from sd_server.domain.models import CheckpointModel, LoraModel, parse_model
from sd_server.storage.model_files import checkpoint_location


def test_settings_are_read_from_sd_environment_variables(monkeypatch):
    monkeypatch.setenv("SD_DEFAULT_MODEL", "runwayml/stable-diffusion-v1-5")
    monkeypatch.setenv("SD_USER_MODELS", '{"alice": "alice-dreambooth"}')
    monkeypatch.setenv("SD_CACHE_DEVICE_GB", "12.5")
    monkeypatch.setenv("SD_CORS_ORIGINS", '["https://app.example"]')
    monkeypatch.setenv("SD_SAVE_IMAGES", "false")

    settings = Settings(_env_file=None)

    assert settings.default_model == "runwayml/stable-diffusion-v1-5"
    assert settings.user_model_map == {"default": "runwayml/stable-diffusion-v1-5", "alice": "alice-dreambooth"}
    assert settings.cache_device_gb == 12.5
    assert settings.cors_origins == ["https://app.example"]
    assert settings.save_images is False


def test_defaults_serve_the_photoai_dreambooth_model_on_port_8000():
    settings = Settings(_env_file=None)

    assert settings.default_model == "Zhurah/sd15-dreambooth-photoai"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.safety_checker is False


def test_user_models_file_is_merged_and_the_environment_wins(tmp_path):
    mapping_file = tmp_path / "users.json"
    mapping_file.write_text(json.dumps({"alice": "from-file", "bob": "bob-model"}))

    settings = Settings(_env_file=None, user_models_file=mapping_file, user_models={"alice": "from-env"})

    assert settings.user_model_map == {
        "default": "Zhurah/sd15-dreambooth-photoai",
        "alice": "from-env",
        "bob": "bob-model",
    }


def test_user_models_take_the_simple_form_and_the_lora_object_form(monkeypatch):
    lora = {"kind": "lora", "base": "demo", "source": "loras/bob.safetensors", "scale": 0.8}
    monkeypatch.setenv("SD_USER_MODELS", json.dumps({"alice": "alice-dreambooth", "bob": lora}))

    mapping = Settings(_env_file=None).user_model_map

    assert parse_model(mapping["alice"]) == CheckpointModel(source="alice-dreambooth")
    assert parse_model(mapping["bob"]) == LoraModel(base="demo", source="loras/bob.safetensors", scale=0.8)


def test_checkpoint_location_is_a_folder_under_models_dir_when_one_has_that_name(tmp_path):
    (tmp_path / "alice-dreambooth").mkdir()

    assert checkpoint_location(tmp_path, "alice-dreambooth") == str(tmp_path / "alice-dreambooth")
    assert checkpoint_location(tmp_path, "Zhurah/sd15-dreambooth-photoai") == "Zhurah/sd15-dreambooth-photoai"


def test_invalid_setting_fails_at_start_naming_it(monkeypatch):
    monkeypatch.setenv("SD_DEVICE", "tpu")

    with pytest.raises(ValueError, match="device"):
        Settings(_env_file=None)


def test_api_scheduler_names_have_their_a1111_sampler_names():
    assert sampler_label("euler_a") == "Euler a"
    assert sampler_label("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert sampler_label("LMSDiscreteScheduler") == "LMSDiscreteScheduler"
