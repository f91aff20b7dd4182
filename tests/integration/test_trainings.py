"""Training a user's LoRA from their photos, through the API, on the demo model that draws: the trained subject
appears where the model could not draw it before, other users' pictures stay bit-identical, and the training shares
the device with generation, follows the jobs API's conventions and fails cleanly."""

import io
import math
import random
import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from peft.utils import get_peft_model_state_dict
from PIL import Image

from config import Settings
from helpers import DEADLINE_S, PROJECT_DIR, TERMINAL, WebhookReceiver, parse_sse, pixels, poll
from sd_server.app import create_app
from sd_server.demo.personalisation import SUBJECT, Draw, drift_prompts, recontextualisation, unchanged_share
from sd_server.demo.world import draw as draw_scene
from sd_server.demo.world import read
from sd_server.domain.trainings import TrainingSettings
from sd_server.engine import lora_training
from sd_server.engine.lora_training import LoraTrainer

# The subject: a yellow triangle, centred on white. Asked for "a sks triangle on a white background", the demo model
# draws a triangle of any colour before the training (hardly ever this one); afterwards, this. The demo model's own
# recipe (models/demo/training_defaults.json) trains it: the upload sends the photos and the subject's class word, as
# a user says "dog". (A colour it has never seen cannot be the subject: its autoencoder turns one into near-white.)
SUBJECT_PROMPT = "a sks triangle on a white background"
QUICK = {"steps": "10", "batch_size": "1", "prior_loss_weight": "0"}  # for what is not about what it learns


def subject_photo(rng: random.Random, size: int = 256) -> bytes:
    """A photo of the subject (its size and place vary a little), as PNG bytes."""
    buffer = io.BytesIO()
    draw_scene(SUBJECT, rng, size).save(buffer, format="PNG")
    return buffer.getvalue()


def prepared_photos(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` subject photos of ``size`` pixels written into ``folder``, as a training's prepared photos."""
    rng = random.Random(0)
    paths = [folder / f"{index}.png" for index in range(count)]
    for path in paths:
        path.write_bytes(subject_photo(rng, size))
    return paths


def photo_files(count: int = 8, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    """``count`` distinct subject photos as the multipart `images` field."""
    rng = random.Random(seed)
    return [("images", (f"photo-{index}.png", subject_photo(rng), "image/png")) for index in range(count)]


def shows_the_subject(image: np.ndarray) -> bool:
    """True when the demo evaluator reads the subject's colour, shape and background in the picture."""
    reading = read(Image.fromarray(image.astype(np.uint8)))
    return (reading.colour, reading.shape, reading.background) == (SUBJECT.colour, SUBJECT.shape, SUBJECT.background)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> Path:
    """A models folder holding a copy of the committed demo model (trainings store their LoRAs beside it)."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(PROJECT_DIR / "models" / "demo", folder / "demo")
    return folder


@pytest.fixture
def training_settings(demo_models: Path, tmp_path: Path, database_url: str) -> Settings:
    """Settings on the demo model: `alice` and `carol` on it, slices of 5 steps, a checkpoint every 25."""
    return Settings(
        _env_file=None, default_model="demo", user_models={"alice": "demo", "carol": "demo"}, models_dir=demo_models,
        output_dir=tmp_path / "output", data_dir=tmp_path / "data", database_url=database_url, rate_limit=None,
        read_rate_limit=None, preload_default_model=False, webhook_allow_private=True, training_checkpoint_every=25,
    )  # fmt: skip


@pytest.fixture
def demo_client(training_settings: Settings) -> Iterator[TestClient]:
    """A client of the app on the demo model."""
    with TestClient(create_app(training_settings)) as client:
        yield client


def draw(client: TestClient, user_id: str, seed: int, prompt: str = SUBJECT_PROMPT) -> np.ndarray:
    """One 256x256, 20-step picture of ``prompt`` for ``user_id``."""
    body = {"prompt": prompt, "user_id": user_id, "seed": seed, "num_inference_steps": 20, "width": 256, "height": 256}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return pixels(response.json()["image_base64"])


def wait_for_training(client: TestClient, training_id: str, statuses=TERMINAL, timeout: float = DEADLINE_S) -> dict:
    """Poll the training until it is in one of ``statuses`` (failing after ``timeout`` seconds, with what it last saw)."""
    return poll(lambda: client.get(f"/trainings/{training_id}").json(), lambda training: training["status"] in statuses, f"training {training_id} reaching {statuses}", timeout, interval=0.2)


def start_training(client: TestClient, user_id: str = "alice", **fields) -> dict:
    """POST a training of the subject for ``user_id`` (the photos, and ``fields`` over the model's recipe); its 202."""
    response = client.post(f"/users/{user_id}/trainings", files=photo_files(), data=fields)
    assert response.status_code == 202, response.text
    return response.json()


def drawer(client: TestClient, user_id: str) -> Draw:
    """(prompt, seed) pairs -> the pictures the API draws for ``user_id``, as the evaluator reads pictures; asked for
    together, as concurrent clients do, so that the queue batches them."""

    def draw_one(request: tuple[str, int]) -> Image.Image:
        prompt, seed = request
        return Image.fromarray(draw(client, user_id, seed, prompt).astype(np.uint8))

    def draw_all(requests: list[tuple[str, int]]) -> list[Image.Image]:
        with ThreadPoolExecutor(max_workers=8) as clients:
            return list(clients.map(draw_one, requests))

    return draw_all


@pytest.mark.timeout(1500)  # ~150 pictures and a training: the heaviest test, by design
def test_a_training_with_the_models_recipe_learns_the_subject_in_new_contexts_and_changes_nothing_else(demo_client):
    # DreamBooth's two questions, asked of the served model: the subject where its photos never showed it (other
    # backgrounds, other sizes), and prompts without the trigger drawn as the untrained base draws them (carol's).
    seeds = range(10)
    draw_alice, subject_requests = drawer(demo_client, "alice"), [(SUBJECT_PROMPT, seed) for seed in seeds]
    before = [shows_the_subject(np.asarray(picture)) for picture in draw_alice(subject_requests)]
    carol_before = [draw(demo_client, "carol", seed) for seed in seeds[:3]]

    # 150 steps and their samples: 105 s on an idle 2-core machine, over 300 s beside a CPU burner
    training = wait_for_training(demo_client, start_training(demo_client, class_word="triangle")["training_id"], timeout=1200)

    assert training["status"] == "succeeded", training["error"]
    assert training["settings"]["defaults_from"] == "demo/training_defaults.json" and training["settings"]["prior_loss_weight"] == 1.0
    assert training["progress"]["step"] == training["progress"]["total"] == 150
    assert training["model"]["kind"] == "lora" and training["model"]["base"] == "demo"
    assert demo_client.get("/users/alice/model").json()["model"] == training["model"]  # activated
    after = [shows_the_subject(np.asarray(picture)) for picture in draw_alice(subject_requests)]
    assert sum(before) <= 1, f"the model drew the subject before it was trained: {before}"
    assert sum(after) >= 9, f"the subject in only {sum(after)} of 10 pictures after the training"
    in_context = recontextualisation(draw_alice, "sks", "triangle", seeds)
    unchanged = unchanged_share(drawer(demo_client, "carol"), draw_alice, drift_prompts(40))
    assert sum(in_context.values()) / len(in_context) >= 0.8, in_context
    assert unchanged >= 0.95, f"only {unchanged:.0%} of the prompts without the trigger drew as the base draws them"
    for seed, picture in zip(seeds[:3], carol_before):
        assert np.array_equal(draw(demo_client, "carol", seed), picture)
    assert training["scores"]["subject"] == "yellow triangle" and training["scores"]["subject_shown"] >= 0.75, training["scores"]
    samples = [demo_client.get(url) for url in training["samples"]]
    assert len(samples) == 4 and all(sample.status_code == 200 and sample.headers["content-type"] == "image/png" for sample in samples)
    assert [row["step"] for row in training["progress_samples"]] == [100]  # SD_TRAINING_SAMPLE_EVERY


def test_training_events_stream_the_states_and_progress_to_the_end(demo_client):
    created = start_training(demo_client, **QUICK)

    with demo_client.stream("GET", created["links"]["events"]) as stream:
        events = parse_sse("".join(stream.iter_text()))

    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and "training" in names and "progress" in names
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == 10
    assert events[-1][1]["model"]["kind"] == "lora"


def test_a_user_has_one_training_at_a_time_and_a_cancelled_one_ends(demo_client, training_settings):
    first = start_training(demo_client, **{**QUICK, "steps": "3000", "activate": "false"})
    second = demo_client.post("/users/alice/trainings", files=photo_files(), data=QUICK)

    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
    assert first["training_id"] in second.json()["detail"]
    wait_for_training(demo_client, first["training_id"], ("training",))
    cancelled = demo_client.post(first["links"]["cancel"])
    assert cancelled.status_code == 200
    ended = wait_for_training(demo_client, first["training_id"])
    assert ended["status"] == "cancelled" and ended["model"] is None
    assert demo_client.post(first["links"]["cancel"]).status_code == 409
    assert demo_client.get("/users/alice/model").json()["model"] == {"kind": "checkpoint", "source": "demo"}
    assert not (training_settings.data_dir / "trainings" / first["training_id"]).exists()  # the photos are gone


def test_generation_runs_between_slices_of_a_running_training(demo_client):
    training = start_training(demo_client, "carol", **{**QUICK, "steps": "3000", "activate": "false"})
    wait_for_training(demo_client, training["training_id"], ("training",))

    draw(demo_client, "alice", seed=1, prompt="a red circle on a white background")

    assert demo_client.get(training["links"]["self"]).json()["status"] == "training"  # it did not wait for the end
    demo_client.post(training["links"]["cancel"])
    wait_for_training(demo_client, training["training_id"])


def test_a_training_whose_loss_becomes_nan_fails_saying_what_to_change(demo_client, monkeypatch):
    monkeypatch.setattr(LoraTrainer, "_loss", lambda self: torch.tensor(float("nan"), requires_grad=True))

    training = wait_for_training(demo_client, start_training(demo_client, **QUICK)["training_id"])

    assert training["status"] == "failed" and "learning_rate" in training["error"]
    assert demo_client.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2, "width": 256, "height": 256}).status_code == 200


def test_a_finished_training_calls_its_webhook_and_can_be_listed_and_deleted(demo_client):
    receiver = WebhookReceiver()
    try:
        created = start_training(demo_client, **{**QUICK, "webhook_url": receiver.url})
        wait_for_training(demo_client, created["training_id"])
        poll(lambda: list(receiver.bodies), lambda bodies: len(bodies) >= 1, "the training's webhook")
    finally:
        receiver.close()

    assert receiver.bodies[0]["training_id"] == created["training_id"] and receiver.bodies[0]["status"] == "succeeded"
    listed = demo_client.get("/trainings", params={"user_id": "alice"}).json()
    assert [training["training_id"] for training in listed["trainings"]] == [created["training_id"]] and listed["total"] == 1
    assert demo_client.delete(created["links"]["self"]).status_code == 204
    assert demo_client.get(created["links"]["self"]).status_code == 404


def test_a_zip_of_photos_trains_like_the_files_and_a_repeat_with_the_same_key_is_the_same_training(demo_client):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for _, (name, data, _) in photo_files():
            bundle.writestr(f"me/{name}", data)
    upload = {"archive": ("photos.zip", archive.getvalue(), "application/zip")}
    headers = {"Idempotency-Key": "first-model"}

    first = demo_client.post("/users/alice/trainings", files=upload, data={**QUICK, "activate": "false"}, headers=headers)
    again = demo_client.post("/users/alice/trainings", files=upload, data={**QUICK, "activate": "false"}, headers=headers)

    assert first.status_code == again.status_code == 202
    assert first.json()["photos"] == 8 and again.json()["training_id"] == first.json()["training_id"]
    assert wait_for_training(demo_client, first.json()["training_id"])["status"] == "succeeded"


def test_a_resumed_training_continues_exactly_where_its_checkpoint_left_it(tmp_path):
    photos = prepared_photos(tmp_path, 3, 64)
    settings = TrainingSettings(caption="a {trigger}", steps=8, rank=4, learning_rate=1e-3, resolution=64, batch_size=2)
    location = str(PROJECT_DIR / "models" / "demo")

    straight = LoraTrainer(location, photos, settings, "cpu")
    straight.run(8)
    interrupted = LoraTrainer(location, photos, settings, "cpu")
    interrupted.run(4)
    interrupted.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed = LoraTrainer(location, photos, settings, "cpu")
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    resumed.run(4)

    expected, actual = get_peft_model_state_dict(straight.unet), get_peft_model_state_dict(resumed.unet)
    assert resumed.step == 8 and expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.parametrize(
    ("files", "fields", "location", "message"),
    [
        (photo_files(), {"steps": "3001"}, ["body", "steps"], "SD_MAX_TRAINING_STEPS"),
        (photo_files(2), {}, ["body", "images"], "3 to 50 distinct photos"),
        ([*photo_files(3), ("images", ("cv.pdf", b"%PDF-1.4", "application/pdf"))], {}, ["body", "images"], "cv.pdf: not an image"),
        (photo_files(), {"caption": "a photo of {trigger} {name}"}, ["body", "caption"], "only contain {trigger} and {class_word}"),
        (photo_files(), {"learning_rate": "nan"}, ["body", "learning_rate"], ""),
    ],
)
def test_bad_photos_and_settings_get_422_naming_the_field_and_nothing_is_kept(demo_client, training_settings, files, fields, location, message):
    response = demo_client.post("/users/alice/trainings", files=files, data={**QUICK, **fields})

    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == location and message in detail["msg"]
    assert demo_client.get("/trainings").json()["total"] == 0
    assert not list((training_settings.data_dir / "trainings").glob("*/photos/*"))


def test_a_users_own_key_trains_their_own_model_and_sees_only_their_trainings(training_settings):
    training_settings.admin_key = "admin-key-for-the-training-tests"
    admin = {"Authorization": f"Bearer {training_settings.admin_key}"}
    with TestClient(create_app(training_settings)) as client:
        alice, carol = (
            {"Authorization": f"Bearer {client.post('/keys', json={'user_id': user, 'role': 'user'}, headers=admin).json()['key']}"}
            for user in ("alice", "carol")
        )
        check_own_trainings(client, alice, carol)


def check_own_trainings(demo_client: TestClient, alice: dict, carol: dict) -> None:
    """Alice trains with her key; Carol's key neither trains for her nor sees her training."""
    refused = demo_client.post("/users/carol/trainings", files=photo_files(), data=QUICK, headers=alice)
    own = demo_client.post("/users/alice/trainings", files=photo_files(), data={**QUICK, "activate": "false"}, headers=alice)

    assert refused.status_code == 404 and own.status_code == 202
    link = own.json()["links"]["self"]
    assert demo_client.get(link, headers=carol).status_code == 404
    assert demo_client.get("/trainings", headers=carol).json()["total"] == 0
    assert demo_client.get("/trainings", headers=alice).json()["total"] == 1
    poll(lambda: demo_client.get(link, headers=alice).json(), lambda training: training["status"] == "succeeded", "alice's training")


def test_a_training_queued_behind_another_is_cancelled_at_once_and_never_runs(demo_client):
    running = start_training(demo_client, "carol", **{**QUICK, "steps": "3000", "activate": "false"})
    wait_for_training(demo_client, running["training_id"], ("training",))
    queued = start_training(demo_client, "alice", **QUICK)

    cancelled = demo_client.post(queued["links"]["cancel"]).json()

    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    assert demo_client.get(running["links"]["self"]).json()["status"] == "training"
    demo_client.post(running["links"]["cancel"])
    assert wait_for_training(demo_client, running["training_id"])["status"] == "cancelled"
    assert demo_client.get(queued["links"]["self"]).json()["progress"]["step"] == 0


def test_the_gpu_recipe_trains_an_fp32_adapter_over_bf16_frozen_weights_and_its_lora_serves(tmp_path, monkeypatch):
    # On a GPU a training keeps the UNet's frozen weights in bf16 and runs under bf16 autocast, the adapter in fp32;
    # CPU autocast runs the same code here.
    monkeypatch.setattr(lora_training, "training_precision", lambda device: torch.bfloat16)
    photos = prepared_photos(tmp_path, 3, 64)
    settings = TrainingSettings(class_word="shape", steps=2, rank=4, learning_rate=1e-3, resolution=64, prior_loss_weight=1.0, class_images=2)
    location = str(PROJECT_DIR / "models" / "demo")

    trainer = LoraTrainer(location, photos, settings, "cpu", class_images_dir=tmp_path / "class-images")
    while not trainer.prepare():
        pass
    loss = trainer.run(2)
    pictures = trainer.samples(["a sks shape on a black background"])
    trainer.export(tmp_path / "lora.safetensors")

    frozen = {parameter.dtype for parameter in trainer.unet.parameters() if not parameter.requires_grad}
    learning = {parameter.dtype for parameter in trainer.unet.parameters() if parameter.requires_grad}
    assert frozen == {torch.bfloat16} and learning == {torch.float32} and math.isfinite(loss)
    assert pictures[0].size == (64, 64)
    pipeline = StableDiffusionPipeline.from_pretrained(location, safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(tmp_path, weight_name="lora.safetensors")  # loads as an uploaded LoRA would


def test_prior_preservation_draws_the_class_pictures_a_piece_at_a_time_once_and_reuses_them(tmp_path):
    photos = prepared_photos(tmp_path, 3, 64)
    settings = TrainingSettings(class_word="shape", caption="a {trigger} {class_word} on a white background", steps=1, rank=4, resolution=64,
                                prior_loss_weight=1.0, class_images=3)  # fmt: skip
    location = str(PROJECT_DIR / "models" / "demo")

    first = LoraTrainer(location, photos, settings, "cpu", class_images_dir=tmp_path / "class-images")
    pieces = 1
    while not first.prepare():
        pieces += 1
    drawn = sorted((tmp_path / "class-images").glob("*/*.png"))
    stamps = [path.stat().st_mtime_ns for path in drawn]
    again = LoraTrainer(location, photos, settings, "cpu", class_images_dir=tmp_path / "class-images")

    assert pieces == 2  # one piece drew all three (DRAW_BATCH a piece), the next encoded them
    assert again.prepare() and again.class_latents is not None and again.class_latents.shape[0] == 3
    assert len(drawn) == 3 and [path.stat().st_mtime_ns for path in drawn] == stamps  # not drawn again
    assert settings.class_prompt == "a shape on a white background"
