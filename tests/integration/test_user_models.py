"""Per-user models at scale: the registry and its routes, LoRA uploads, the two-tier byte-budgeted cache, shared
components, the loader thread, and isolation between users."""

import gc
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from PIL import Image
from torch._subclasses.fake_tensor import is_fake

from helpers import DEADLINE_S, pixels, wait_for
from model_service import ModelService
from sd_server.app import create_app
from sd_server.demo.random_pipeline import save_random_lora, save_random_pipeline
from sd_server.domain.models import CheckpointModel
from sd_server.engine import cache as engine_cache
from sd_server.engine.devices import module_bytes
from sd_server.engine.interface import BatchItem, BatchKey

LORA_ALICE = {"kind": "lora", "base": "demo", "source": "loras/alice.safetensors", "scale": 1.0}
LORA_BOB = {"kind": "lora", "base": "demo", "source": "loras/bob.safetensors", "scale": 1.0}


@pytest.fixture(scope="session")
def demo_bytes(models_dir: Path) -> int:
    """Bytes of the demo checkpoint's weights (UNet, VAE, text encoder) in float32."""
    pipeline = StableDiffusionPipeline.from_pretrained(models_dir / "demo")
    return sum(module_bytes(module) for module in pipeline.components.values() if isinstance(module, torch.nn.Module))


def gib(nbytes: float) -> float:
    """Bytes as the GiB that SD_CACHE_*_GB take."""
    return nbytes / 1024**3


def generate(client: TestClient, small_request, user_id: str, **fields) -> np.ndarray:
    """The pixels of the user's image for the small request (seed 1 unless given)."""
    response = client.post("/generate", json=small_request(user_id=user_id, **fields))
    assert response.status_code == 200, response.text
    return pixels(response.json()["image_base64"])


def cache(client: TestClient) -> dict:
    return client.get("/health").json()["cache"]


# --- the registry and its routes -------------------------------------------------------------------


def test_put_model_then_get_returns_it_and_generation_uses_it(client, small_request):
    response = client.put("/users/carol/model", json={"kind": "checkpoint", "source": "demo2"})

    assert response.status_code == 200
    assert response.json() == {"user_id": "carol", "model": {"kind": "checkpoint", "source": "demo2"}, "origin": "api"}
    assert client.get("/users/carol/model").json() == response.json()
    result = client.post("/generate", json=small_request(user_id="carol")).json()
    assert result["model_id"] == "demo2"
    assert np.array_equal(pixels(result["image_base64"]), generate(client, small_request, "bob"))  # bob runs demo2


def test_the_simple_settings_form_reads_back_as_a_checkpoint_from_settings(client):
    assert client.get("/users/alice/model").json() == {
        "user_id": "alice",
        "model": {"kind": "checkpoint", "source": "demo"},
        "origin": "settings",
    }


def test_lora_users_get_images_unlike_the_base_and_unlike_each_other(client, small_request):
    client.put("/users/carol/model", json=LORA_ALICE)
    client.put("/users/dave/model", json=LORA_BOB)
    client.put("/users/erin/model", json={**LORA_ALICE, "scale": 0.5})

    base, carol, dave, erin = (generate(client, small_request, user) for user in ("default", "carol", "dave", "erin"))

    for first, second in ((base, carol), (base, dave), (carol, dave), (carol, erin)):
        assert not np.array_equal(first, second)
    job = client.post("/generate", json=small_request(user_id="carol")).json()
    assert job["model_id"] == "demo+loras/alice.safetensors"


def test_registry_changes_persist_across_restarts(settings, small_request):
    with TestClient(create_app(settings)) as client:
        client.put("/users/carol/model", json=LORA_ALICE)
        assert client.delete("/users/alice/model").status_code == 204

    with TestClient(create_app(settings)) as client:
        assert client.get("/users/carol/model").json() == {"user_id": "carol", "model": LORA_ALICE, "origin": "api"}
        assert client.get("/users/alice/model").status_code == 404
        assert client.post("/generate", json=small_request(user_id="alice")).status_code == 404
        assert client.post("/generate", json=small_request(user_id="carol")).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "checkpoint", "source": "../demo"}, "source"),
        ({"kind": "checkpoint", "source": "demo/../../demo"}, "source"),
        ({"kind": "checkpoint", "source": "/etc"}, "source"),
        ({"kind": "checkpoint", "source": "escape"}, "source"),  # a symlink out of SD_MODELS_DIR
        ({"kind": "checkpoint", "source": "no-such-folder"}, "source"),
        ({"kind": "checkpoint", "source": "loras"}, "source"),  # a folder, not a pipeline
        ({"kind": "checkpoint", "source": "nul\u0000byte"}, "source"),
        ({"kind": "checkpoint", "source": "x" * 300}, "source"),  # longer than a file name may be
        ({**LORA_ALICE, "source": "../loras/alice.safetensors"}, "source"),
        ({**LORA_ALICE, "source": "loras/missing.safetensors"}, "source"),
        ({**LORA_ALICE, "base": "/tmp"}, "base"),
    ],
)
def test_sources_outside_models_dir_or_missing_are_refused_with_422(client, models_dir, tmp_path, body, field):
    escape = models_dir / "escape"
    if not escape.exists():
        escape.symlink_to(tmp_path, target_is_directory=True)

    response = client.put("/users/carol/model", json=body)

    assert response.status_code == 422, response.text
    location = response.json()["detail"][0]["loc"]  # the schema's own refusals name the model's kind on the way
    assert location in (["body", field], ["body", body["kind"], field])
    assert client.get("/users/carol/model").status_code == 404


def test_a_hub_id_is_accepted_and_a_download_failure_at_use_is_503(client, small_request):
    assert client.put("/users/carol/model", json={"kind": "checkpoint", "source": "nobody/no-such-model"}).status_code == 200

    response = client.post("/generate", json=small_request(user_id="carol"))

    assert response.status_code == 503 and "nobody/no-such-model" in response.json()["detail"]


def test_delete_removes_the_user_and_the_default_user_cannot_be_removed(client, small_request):
    assert client.delete("/users/alice/model").status_code == 204

    assert client.post("/generate", json=small_request(user_id="alice")).status_code == 404
    assert client.get("/users/alice/model").status_code == 404
    assert client.delete("/users/alice/model").status_code == 404
    response = client.delete("/users/default/model")
    assert response.status_code == 409 and "SD_DEFAULT_MODEL" in response.json()["detail"]


# --- LoRA uploads --------------------------------------------------------------------------------------


def test_an_uploaded_lora_becomes_the_users_model_stored_by_content_hash(client, models_dir, small_request):
    content = (models_dir / "loras" / "alice.safetensors").read_bytes()

    response = client.post("/users/carol/lora", files={"file": ("alice.safetensors", content)}, data={"scale": "1.0"})

    assert response.status_code == 201, response.text
    model = response.json()["model"]
    assert model["kind"] == "lora" and model["base"] == "demo" and model["scale"] == 1.0
    assert (models_dir / model["source"]).read_bytes() == content
    client.put("/users/dave/model", json=LORA_ALICE)
    assert np.array_equal(generate(client, small_request, "carol"), generate(client, small_request, "dave"))


def wrong_shape_lora(models_dir: Path) -> bytes:
    """The alice LoRA with every tensor replaced by one of another shape."""
    tensors = safetensors.torch.load_file(models_dir / "loras" / "alice.safetensors")
    return safetensors.torch.save({name: torch.zeros(3, 5) for name in tensors})


def nan_lora(models_dir: Path) -> bytes:
    """The alice LoRA with NaN weights (it would turn every image black)."""
    tensors = safetensors.torch.load_file(models_dir / "loras" / "alice.safetensors")
    return safetensors.torch.save({name: torch.full_like(tensor, float("nan")) for name, tensor in tensors.items()})


def lora_with_a_stray_layer(models_dir: Path) -> bytes:
    """The alice LoRA plus a pair of weights for a layer the base does not have (they would be dropped silently)."""
    tensors = safetensors.torch.load_file(models_dir / "loras" / "alice.safetensors")
    stray = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"
    return safetensors.torch.save({**tensors, f"{stray}.lora_A.weight": torch.zeros(4, 32), f"{stray}.lora_B.weight": torch.zeros(32, 4)})


@pytest.mark.parametrize(
    "make_content",
    [
        lambda models_dir: b"this is not a safetensors file",
        wrong_shape_lora,
        lambda models_dir: safetensors.torch.save({"text_model.unrelated.weight": torch.zeros(2, 2)}),
        nan_lora,
        lora_with_a_stray_layer,
    ],
    ids=["not-safetensors", "wrong-shapes", "no-matching-layer", "nan-weights", "a-stray-layer"],
)
def test_an_upload_that_does_not_load_onto_the_base_is_422_and_nothing_is_stored(
    client, models_dir, small_request, make_content
):
    before_files = sorted((models_dir / "loras").iterdir())
    base_before = generate(client, small_request, "default")

    response = client.post("/users/carol/lora", files={"file": ("bad.safetensors", make_content(models_dir))})

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "file"]
    assert sorted((models_dir / "loras").iterdir()) == before_files
    assert client.get("/users/carol/model").status_code == 404
    assert np.array_equal(generate(client, small_request, "default"), base_before)
    assert cache(client)["adapters"]["resident"] == []


def test_an_upload_onto_a_base_that_cannot_load_is_422_naming_the_base(client, models_dir):
    broken = models_dir / "broken-base"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    content = (models_dir / "loras" / "alice.safetensors").read_bytes()

    response = client.post("/users/carol/lora", files={"file": ("alice.safetensors", content)}, data={"base": "broken-base"})

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "base"]
    assert str(models_dir) not in response.text


def test_uploads_have_their_own_size_cap(settings, models_dir, small_request):
    settings.max_body_bytes, settings.max_upload_bytes = 1024, 100_000
    content = (models_dir / "loras" / "alice.safetensors").read_bytes()
    assert 1024 < len(content) < 100_000
    with TestClient(create_app(settings)) as client:
        assert client.post("/users/carol/lora", files={"file": ("a.safetensors", content)}).status_code == 201

        response = client.post("/users/carol/lora", files={"file": ("big.safetensors", b"x" * 100_001)})

    assert response.status_code == 413 and "SD_MAX_UPLOAD_BYTES" in response.json()["detail"]


# --- isolation ------------------------------------------------------------------------------------------


ISOLATION_USERS = {
    "alice": LORA_ALICE,
    "bob": LORA_BOB,
    "carol": "demo",
    "dave": "demo-dreambooth",
    "erin": {**LORA_ALICE, "base": "demo-dreambooth"},
}


def test_each_users_image_is_exactly_the_same_after_any_interleaving_of_users(settings, small_request, demo_bytes):
    settings.user_models = dict(ISOLATION_USERS)
    settings.max_batch_size, settings.max_adapters = 1, 1  # adapters are evicted and loaded again on the way
    settings.cache_device_gb, settings.cache_cpu_gb = gib(1.5 * demo_bytes), gib(1.5 * demo_bytes)  # bases move tiers
    alone = {}
    for user in ISOLATION_USERS:
        with TestClient(create_app(settings)) as client:
            alone[user] = generate(client, small_request, user, seed=7)

    order = ["alice", "carol", "bob", "alice", "dave", "erin", "bob", "carol", "alice", "dave", "erin", "bob", "erin"]
    with TestClient(create_app(settings)) as client:
        for user in order:
            assert np.array_equal(generate(client, small_request, user, seed=7), alone[user]), user

    images = list(alone.values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])


def test_with_batching_across_adapters_off_each_users_jobs_batch_alone_and_exactly_as_before(settings, small_request):
    settings.user_models = dict(ISOLATION_USERS)
    settings.max_batch_size, settings.batch_wait_ms = 3, 5000  # each user's three jobs form one batch
    settings.batch_across_adapters = False
    seeds = (7, 8, 9)
    alone = {}
    for user in ISOLATION_USERS:
        with TestClient(create_app(settings)) as client:
            ids = [client.post("/jobs", json=small_request(user_id=user, seed=seed)).json()["job_id"] for seed in seeds]
            alone[user] = [image_of(client, wait_for(client, job_id)) for job_id in ids]

    order = [(user, seed) for seed in seeds for user in ("alice", "carol", "bob", "erin", "dave")]
    with TestClient(create_app(settings)) as client:
        ids = {(user, seed): client.post("/jobs", json=small_request(user_id=user, seed=seed)).json()["job_id"] for user, seed in order}
        jobs = {job: wait_for(client, job_id) for job, job_id in ids.items()}
        mixed = {job: image_of(client, result) for job, result in jobs.items()}

    assert {job["batch_size"] for job in jobs.values()} == {3}
    for user, seed in order:
        assert np.array_equal(mixed[user, seed], alone[user][seeds.index(seed)]), (user, seed)


def image_of(client: TestClient, job: dict) -> np.ndarray:
    """The pixels of a finished job's first image."""
    assert job["status"] == "succeeded", job
    return np.asarray(Image.open(io.BytesIO(client.get(job["result"]["image_url"]).content)).convert("RGB"))


def test_removing_a_user_model_unloads_it_unless_another_user_runs_on_it(client, small_request):
    client.put("/users/carol/model", json=LORA_ALICE)
    generate(client, small_request, "carol")
    generate(client, small_request, "bob")
    assert cache(client)["adapters"]["resident"] == ["loras/alice.safetensors"]

    client.delete("/users/carol/model")
    client.delete("/users/bob/model")
    client.delete("/users/alice/model")  # on demo, like the default user

    assert cache(client)["adapters"] == {**cache(client)["adapters"], "resident": [], "bytes": 0}
    assert client.get("/health").json()["loaded_models"] == ["demo"]


# --- the cache --------------------------------------------------------------------------------------------


def test_lru_checkpoints_move_to_the_cpu_tier_then_out_within_the_byte_budgets(settings, small_request, load_calls, demo_bytes):
    settings.cache_device_gb = settings.cache_cpu_gb = gib(1.5 * demo_bytes)
    settings.user_models["carol"] = "demo3"
    with TestClient(create_app(settings)) as client:
        for user, device, cpu in (
            ("default", ["demo"], []),
            ("bob", ["demo2"], ["demo"]),
            ("carol", ["demo3"], ["demo2"]),
            ("bob", ["demo2"], ["demo3"]),  # from host RAM: no load from disk
            ("default", ["demo"], ["demo2"]),  # evicted earlier: from disk again
        ):
            generate(client, small_request, user)
            report = cache(client)
            assert (report["device"]["models"], report["cpu"]["models"]) == (device, cpu), user
            for tier in ("device", "cpu"):
                assert report[tier]["bytes"] <= report[tier]["budget_bytes"]
                assert (report[tier]["bytes"] > 0) == bool(report[tier]["models"])

    assert [Path(call).name for call in load_calls] == ["demo", "demo2", "demo3", "demo"]
    assert report["cpu"]["hits"] == 1 and report["cpu"]["misses"] == 4 and report["cpu"]["evictions"] == 2
    assert report["device"]["evictions"] == 4 and report["device"]["misses"] == 5


def test_a_model_in_use_by_a_running_batch_is_never_evicted(settings, demo_bytes):
    settings.cache_device_gb, settings.cache_cpu_gb = gib(1.5 * demo_bytes), gib(3 * demo_bytes)
    service = ModelService(settings)
    demo, demo2 = CheckpointModel(source="demo"), CheckpointModel(source="demo2")
    key = BatchKey("demo", 256, 256, 2, 7.5, None)
    during_run = []

    def on_step(step: int, total: int, previews: list[bytes] | None = None) -> None:
        if step == 1:
            during_run.append((service.prepare(demo2), service.is_ready(demo)))

    service.run_batch(key, [BatchItem(demo, "a photo", None, 1, 1)], on_step, lambda: False)

    assert during_run == [(False, True)]
    assert service.prepare(demo2) and not service.is_ready(demo)  # idle now: moved to the CPU tier
    assert service.cache_report()["cpu"]["models"] == ["demo"]


def test_identical_components_are_loaded_once_and_counted_once(settings, small_request, demo_bytes):
    settings.user_models["dave"] = "demo-dreambooth"
    with TestClient(create_app(settings)) as client:
        generate(client, small_request, "default")
        generate(client, small_request, "dave")
        engine = client.app.state.services.engine
        demo, dreambooth = (engine.cache.checkpoints[source].pipeline for source in ("demo", "demo-dreambooth"))
        report = cache(client)

    assert demo.vae is dreambooth.vae and demo.text_encoder is dreambooth.text_encoder
    assert demo.unet is not dreambooth.unet
    assert report["shared_components"] == 2
    assert report["device"]["bytes"] == demo_bytes + module_bytes(dreambooth.unet)


def test_switching_between_resident_adapters_reloads_nothing(client, small_request, load_calls):
    client.put("/users/carol/model", json=LORA_ALICE)
    client.put("/users/dave/model", json=LORA_BOB)

    first = {user: generate(client, small_request, user) for user in ("carol", "dave")}
    for _ in range(2):
        for user in ("carol", "dave", "default"):
            image = generate(client, small_request, user)
            if user in first:
                assert np.array_equal(image, first[user])

    adapters = cache(client)["adapters"]
    assert len(load_calls) == 1
    assert (adapters["misses"], adapters["hits"]) == (2, 4)


def test_a_cold_model_loads_while_other_users_jobs_run(settings, small_request, monkeypatch):
    original = engine_cache.StableDiffusionPipeline.from_pretrained
    disk_ready = threading.Event()

    def slow_disk(source, **options):
        if str(source).endswith("demo2"):
            disk_ready.wait(DEADLINE_S)
        return original(source, **options)

    monkeypatch.setattr(engine_cache.StableDiffusionPipeline, "from_pretrained", slow_disk)
    with TestClient(create_app(settings)) as client:
        generate(client, small_request, "default")  # demo is resident
        cold = client.post("/jobs", json=small_request(user_id="bob")).json()["job_id"]
        warm = [client.post("/jobs", json=small_request(seed=seed)).json()["job_id"] for seed in (2, 3, 4)]

        warm_jobs = [wait_for(client, job_id) for job_id in warm]
        cold_then = client.get(f"/jobs/{cold}").json()
        disk_ready.set()
        cold_job = wait_for(client, cold)

    assert all(job["status"] == "succeeded" for job in warm_jobs)
    assert cold_then["status"] == "queued"  # still loading when the others were done
    assert cold_job["status"] == "succeeded"
    assert max(job["finished_at"] for job in warm_jobs) < cold_job["started_at"]


def test_twenty_users_cycling_stay_within_the_memory_budget(settings, models_dir, small_request, demo_bytes):
    cycle = models_dir / "cycle"
    users = {}
    for index in range(10):
        if not (cycle / f"checkpoint-{index}").exists():
            save_random_pipeline(cycle / f"checkpoint-{index}", seed=10 + index)
            save_random_lora(cycle / f"lora-{index}.safetensors", seed=10 + index)
        users[f"ckpt{index}"] = f"cycle/checkpoint-{index}"
        users[f"lora{index}"] = {"kind": "lora", "base": "demo", "source": f"cycle/lora-{index}.safetensors"}
    settings.user_models = users
    settings.cache_device_gb, settings.cache_cpu_gb = gib(3.2 * demo_bytes), gib(2 * demo_bytes)
    settings.max_adapters = 4
    baseline = parameter_storages()

    with TestClient(create_app(settings)) as client:
        peak = 0
        for _ in range(2):
            for user in users:
                generate(client, small_request, user, num_inference_steps=1)
                report = cache(client)
                assert report["device"]["bytes"] <= report["device"]["budget_bytes"]
                assert report["cpu"]["bytes"] <= report["cpu"]["budget_bytes"]
                peak = max(peak, sum(nbytes for ptr, nbytes in parameter_storages().items() if ptr not in baseline))

    assert peak <= report["device"]["budget_bytes"] + report["cpu"]["budget_bytes"]
    assert peak > 3 * demo_bytes  # the budget was used, not left empty
    assert len(report["adapters"]["resident"]) <= 4 and report["cpu"]["evictions"] > 0


def parameter_storages() -> dict[int, int]:
    """Every model parameter alive in this process: its storage's address and bytes (each storage once)."""
    gc.collect()
    storages = {}
    for item in gc.get_objects():
        if isinstance(item, torch.nn.Parameter) and not is_fake(item):  # TorchDynamo's traced stand-ins hold no memory
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages
