"""Batches across users: jobs of different LoRAs (and checkpoint users) on one base share a pipeline call, each image
with its own adapter and scale, and each image equals the same request made alone."""

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from config import Settings
from helpers import pixels, wait_for
from model_service import ModelService
from sd_server.app import create_app
from sd_server.demo.random_pipeline import save_random_lora
from sd_server.domain.models import CheckpointModel, LoraModel, UserModel
from sd_server.engine.interface import BatchItem, BatchKey

KEY = BatchKey("demo", 128, 128, 2, 7.5, None)
BATCHED_TOLERANCE = 2  # a batched matmul may round the last bit differently: at most 2 levels of 255 apart


@pytest.fixture(scope="module")
def mix_loras(models_dir: Path) -> dict[str, LoraModel]:
    """Eight LoRAs on demo of a realistic strength: ranks 2 to 8, one on the convolutional projections too, one on
    to_q alone, one on the text encoder too."""
    shapes = {
        "mix-0": {}, "mix-1": {"rank": 8}, "mix-2": {"rank": 2}, "mix-3": {},
        "mix-4": {"targets": ("to_q",)}, "mix-5": {"targets": ("to_k", "to_v", "proj_in", "proj_out")},
        "mix-6": {"rank": 6}, "mix-7": {"text_encoder": True},
    }  # fmt: skip
    loras = {}
    for index, (name, shape) in enumerate(shapes.items()):
        save_random_lora(models_dir / "loras" / f"{name}.safetensors", seed=100 + index, spread=0.2, **shape)
        loras[name] = LoraModel(base="demo", source=f"loras/{name}.safetensors")
    return loras


@pytest.fixture(scope="module")
def service(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelService:
    """One engine for the module's tests (its adapters stay loaded between them)."""
    return ModelService(Settings(_env_file=None, default_model="demo", models_dir=models_dir, data_dir=tmp_path_factory.mktemp("data")))


def images_of(service: ModelService, models: list[UserModel], seeds: list[int]) -> list[np.ndarray]:
    """The pixels of one pipeline call with one image per (model, seed)."""
    items = [BatchItem(model, f"a photo {seed}", None, seed, 1) for model, seed in zip(models, seeds)]
    output = service.run_batch(KEY, items, lambda step, total, previews=None: None, lambda: False)
    return [np.asarray(images[0].convert("RGB"), dtype=np.int16) for images in output.images]


MIXES = {
    "two adapters": [("mix-0", 1.0), ("mix-1", 1.0)],
    "eight adapters": [(f"mix-{index}", 1.0) for index in range(8)],
    "different scales": [("mix-0", 0.3), ("mix-2", 1.7), ("mix-3", 1.0)],
    "one adapter at two scales": [("mix-0", 0.5), ("mix-0", 1.0)],
    "a user without one": [("mix-1", 1.0), (None, 1.0), ("mix-4", 1.0)],
    "convolutions and a single layer": [("mix-5", 1.0), ("mix-4", 0.8), (None, 1.0)],
    "a text-encoder LoRA": [("mix-7", 1.0), ("mix-0", 1.0), (None, 1.0), ("mix-7", 0.5)],
}


@pytest.mark.parametrize("mix", list(MIXES), ids=list(MIXES))
def test_each_image_of_a_mixed_batch_equals_the_same_request_made_alone(service, mix_loras, mix):
    models = [CheckpointModel(source="demo") if name is None else mix_loras[name].model_copy(update={"scale": scale}) for name, scale in MIXES[mix]]
    seeds = list(range(7, 7 + len(models)))

    mixed = images_of(service, models, seeds)
    alone = [images_of(service, [model], [seed])[0] for model, seed in zip(models, seeds)]

    for index, (together, by_itself) in enumerate(zip(mixed, alone)):
        assert np.abs(together - by_itself).max() <= BATCHED_TOLERANCE, (mix, index, models[index].label)


def test_an_image_of_a_mixed_batch_never_shows_another_users_adapter(service, mix_loras):
    models = [mix_loras["mix-0"], mix_loras["mix-1"], mix_loras["mix-7"], CheckpointModel(source="demo")]

    mixed = images_of(service, models, [5] * len(models))  # one seed and prompt: only the adapter differs
    alone = {model.label: images_of(service, [model], [5])[0] for model in models}

    for model, image in zip(models, mixed):
        for other, other_alone in alone.items():
            difference = np.abs(image - other_alone).max()
            assert (difference <= BATCHED_TOLERANCE) == (other == model.label), (model.label, other, difference)


def test_a_batch_of_one_shared_adapter_runs_without_the_mixing_hooks(service, mix_loras):
    alice = mix_loras["mix-0"]
    images_of(service, [alice, alice], [1, 2])
    checkpoint = service.cache.checkpoints["demo"]

    hooked = [module for module in checkpoint.pipeline.unet.modules() if module._forward_hooks]

    assert hooked == []  # the hooks of a mixed batch are removed after it, and a one-adapter batch adds none


def test_lora_users_of_one_base_are_batched_together_through_the_queue(settings, mix_loras, small_request):
    users = {f"user-{index}": mix_loras[f"mix-{index}"].model_dump() for index in range(4)}
    settings.user_models = {**users, "plain": "demo"}
    settings.max_batch_size, settings.batch_wait_ms = 5, 5000  # the five jobs form one batch
    with TestClient(create_app(settings)) as client:
        ids = {user: client.post("/jobs", json=small_request(user_id=user, seed=3)).json()["job_id"] for user in settings.user_models}
        jobs = {user: wait_for(client, job_id) for user, job_id in ids.items()}
        mixed = {user: job_pixels(client, job) for user, job in jobs.items()}
        queue = client.get("/health").json()["queue"]
        alone = {user: pixels(client.post("/generate", json=small_request(user_id=user, seed=3)).json()["image_base64"]) for user in jobs}

    assert [job["batch_size"] for job in jobs.values()] == [5] * 5
    assert queue["batches_run"] == queue["mixed_batches_run"] == 1
    for user in jobs:
        assert np.abs(mixed[user].astype(np.int16) - alone[user].astype(np.int16)).max() <= BATCHED_TOLERANCE, user


def job_pixels(client: TestClient, job: dict) -> np.ndarray:
    """The pixels of a finished job's first image."""
    assert job["status"] == "succeeded", job
    return np.asarray(Image.open(io.BytesIO(client.get(job["result"]["image_url"]).content)).convert("RGB"))


def test_a_checkpoint_that_shares_its_unet_never_draws_with_the_other_checkpoints_adapter(models_dir, tmp_path):
    shutil.copytree(models_dir / "demo", models_dir / "demo-twin", dirs_exist_ok=True)  # the same files: one UNet in memory
    engine = ModelService(Settings(_env_file=None, default_model="demo", models_dir=models_dir, data_dir=tmp_path))
    twin = replace(KEY, base="demo-twin")
    alone = engine.run_batch(twin, [BatchItem(CheckpointModel(source="demo-twin"), "a photo", None, 3, 1)], lambda *a, **k: None, lambda: False)
    alice = LoraModel(base="demo", source="loras/alice.safetensors")
    engine.run_batch(KEY, [BatchItem(alice, "a photo", None, 3, 1)], lambda *a, **k: None, lambda: False)  # alice's LoRA on
    after = engine.run_batch(twin, [BatchItem(CheckpointModel(source="demo-twin"), "a photo", None, 3, 1)], lambda *a, **k: None, lambda: False)
    assert engine.cache_report()["shared_components"] >= 1
    assert np.array_equal(np.asarray(alone.images[0][0]), np.asarray(after.images[0][0])), "the twin drew with alice's LoRA"
