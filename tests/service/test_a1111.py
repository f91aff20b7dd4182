"""AUTOMATIC1111's API as its clients use it: basic auth read as A1111 reads it, interrupt that keeps what was made,
A1111's ranges and names (422 naming A1111's field), the extras and png-info routes, and users without a model of
their own (the 404 says what to do; SD_FALLBACK_MODEL serves them a base model)."""

import base64
import io
import json
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers import png_bytes, post_job, wait_for

ADMIN_KEY = "admin-key-for-the-a1111-service-tests"


def basic(credentials: str) -> dict[str, str]:
    """An HTTP basic auth header of ``credentials`` as given (``user:key``, ``key``...)."""
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("header", [{"Authorization": "Basic"}, {"Authorization": "Basic !!not-base64"}, basic("user"), basic(":")])
def test_open_mode_ignores_empty_or_malformed_basic_credentials_as_a1111_does(settings, app_factory, header):
    with TestClient(app_factory(settings)) as client:
        response = client.get("/sdapi/v1/options", headers=header)

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("credentials", ["alice:{key}", "{key}", ":{key}", "{key}:"])
def test_with_keys_on_the_key_is_read_from_user_key_or_a_bare_key_in_basic_auth(settings, app_factory, credentials):
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        key = client.post("/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]
        allowed = client.get("/sdapi/v1/options", headers=basic(credentials.format(key=key)))
        refused = client.get("/sdapi/v1/options", headers={"Authorization": "Basic !!not-base64"})

    assert allowed.status_code == 200 and allowed.json()["sd_model_checkpoint"] == "demo"
    assert refused.status_code == 401


def test_a_user_key_without_a_model_is_told_to_train_one_or_ask_an_admin(settings, app_factory):
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        key = client.post("/keys", json={"user_id": "carol"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo", "steps": 2}, headers=basic(f"carol:{key}"))

    assert response.status_code == 404
    assert "POST /users/carol/trainings" in response.json()["detail"] and "SD_FALLBACK_MODEL" in response.json()["detail"]


def test_sd_fallback_model_serves_users_without_a_model_and_the_answer_names_it(settings, app_factory, small_request):
    settings.fallback_model = "plain-base"
    with TestClient(app_factory(settings)) as client:
        carols = client.post("/generate", json=small_request(user_id="carol"))
        alices = client.post("/generate", json=small_request(user_id="alice"))
        a1111 = client.get("/sdapi/v1/options")
        own = client.get("/users/carol/model")

    assert carols.status_code == 200 and carols.json()["model_id"] == "plain-base"
    assert alices.json()["model_id"] == "demo"  # a user's own model wins
    assert a1111.json()["sd_model_checkpoint"] == "demo"  # open mode acts as the default user
    assert own.status_code == 404  # carol still has no model of her own


def test_interrupt_finishes_the_callers_running_job_early_with_its_images(settings, app_factory, gated, small_request):
    with TestClient(app_factory(settings)) as client:
        job_id = post_job(client, small_request, num_inference_steps=10)
        gated.release(2)
        wait_for(client, job_id, "running")
        interrupted = client.post("/sdapi/v1/interrupt")
        progress = client.get("/sdapi/v1/progress").json()
        gated.release(1000)
        job = wait_for(client, job_id)

    assert interrupted.status_code == 200
    assert job["status"] == "succeeded" and len(job["result"]["images"]) == 1
    assert job["progress"]["step"] < job["progress"]["total"] == 10
    assert progress["state"]["stopping_generation"] is True or progress["state"]["job_count"] == 0


def test_interrupt_of_a_job_sharing_its_batch_with_another_user_ends_it_and_lets_the_other_finish(settings, app_factory, engine, gated, small_request):
    engine.load_gate = threading.Event()  # both jobs queue, then run as one batch
    with TestClient(app_factory(settings)) as client:
        callers = post_job(client, small_request, seed=1, num_inference_steps=5)
        alices = post_job(client, small_request, seed=2, num_inference_steps=5, user_id="alice")
        engine.load_gate.set()
        gated.release(1)
        wait_for(client, callers, "running")
        client.post("/sdapi/v1/interrupt")  # open mode: the caller is the default user
        gated.release(1000)
        jobs = [wait_for(client, job_id) for job_id in (callers, alices)]

    assert [job["status"] for job in jobs] == ["cancelled", "succeeded"]
    assert engine.batch_sizes() == [2] and jobs[1]["progress"]["step"] == 5


def test_interrupt_cancels_a_job_still_queued_and_skip_leaves_it(settings, app_factory, engine, small_request):
    engine.load_gate = threading.Event()  # nothing runs
    with TestClient(app_factory(settings)) as client:
        job_id = post_job(client, small_request)
        client.post("/sdapi/v1/skip")
        skipped = client.get(f"/jobs/{job_id}").json()["status"]
        client.post("/sdapi/v1/interrupt")
        interrupted = wait_for(client, job_id)["status"]
        engine.load_gate.set()

    assert (skipped, interrupted) == ("queued", "cancelled")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cfg_scale": 31}, "cfg_scale"),
        ({"width": 2056}, "width"),
        ({"height": 60}, "height"),
        ({"sampler_name": "DPM fast"}, "sampler_name"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
        ({"scheduler": "Spiral"}, "scheduler"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"enable_hr": True, "hr_scale": 4, "width": 1024}, "hr_scale"),
    ],
)
def test_a1111_values_out_of_a1111s_own_ranges_are_422_naming_a1111s_field(client, fields, field):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo", "steps": 2, **fields})

    assert response.status_code == 422
    assert field in str(response.json()["detail"])


@pytest.mark.parametrize(
    "fields",
    [
        {"cfg_scale": 30, "width": 64, "height": 2048},
        {"sampler_name": "DPM++ 2M SDE", "scheduler": "Karras"},
        {"sampler_name": "DPM++ 2M SDE Karras", "scheduler": "normal"},
        {"sampler_name": "Euler", "scheduler": "Automatic"},
    ],
)
def test_a1111s_ranges_and_sampler_names_are_accepted(client, fields):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo", "steps": 2, **fields})

    assert response.status_code == 200, response.text
    info = response.json()["info"]
    assert '"sd_model_hash": "' in info and '"is_using_inpainting_conditioning": false' in info


def test_extras_resize_by_a_factor_or_to_a_size_and_refuse_what_is_too_large_before_decoding(client):
    image = b64(png_bytes(seed=1, size=64))
    doubled = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "Lanczos", "upscaling_resize": 2})
    sized = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "Nearest", "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 80})
    too_large = client.post("/sdapi/v1/extra-single-image", json={"image": b64(png_bytes(seed=1, size=1100)), "upscaling_resize": 2})
    unknown = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "R-ESRGAN 4x+"})

    assert Image.open(io.BytesIO(base64.b64decode(doubled.json()["image"]))).size == (128, 128)
    assert Image.open(io.BytesIO(base64.b64decode(sized.json()["image"]))).size == (96, 80)
    assert too_large.status_code == 422 and "upscaling_resize" in too_large.json()["detail"][0]["loc"]
    assert unknown.status_code == 422 and "upscaler_1" in unknown.json()["detail"][0]["loc"]


def test_png_info_reads_the_parameters_a_generated_png_carries_and_refuses_what_is_not_an_image(client):
    made = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "negative_prompt": "a dog", "steps": 2, "seed": 4}).json()
    info = client.post("/sdapi/v1/png-info", json={"image": made["images"][0]}).json()
    plain = client.post("/sdapi/v1/png-info", json={"image": b64(png_bytes(seed=1))}).json()
    not_an_image = client.post("/sdapi/v1/png-info", json={"image": b64(b"not an image")})

    assert info["parameters"]["Prompt"] == "a cat" and info["parameters"]["Negative prompt"] == "a dog"
    assert info["parameters"]["Seed"] == "4" and info["info"] == info["items"]["parameters"]
    assert plain == {"info": "", "items": {}, "parameters": {}}
    assert not_an_image.status_code == 422 and not_an_image.json()["detail"][0]["loc"][-1] == "image"


def test_hires_fix_through_a1111_runs_both_passes_and_says_so_in_info(client, engine):
    response = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a photo", "steps": 4, "width": 256, "height": 256, "enable_hr": True, "hr_scale": 1.5,
        "hr_upscaler": "Lanczos", "hr_second_pass_steps": 6, "denoising_strength": 0.5,
    })  # fmt: skip

    info = json.loads(response.json()["info"])
    assert response.status_code == 200
    assert info["extra_generation_params"] == {"Hires resize": "384x384", "Hires steps": 6, "Hires upscaler": "Lanczos"}
    assert info["denoising_strength"] == 0.5 and "Hires upscaler: Lanczos" in info["infotexts"][0]
    key, _ = engine.batches[-1]
    assert (key.hires.width, key.hires.height, key.hires.steps, key.hires.strength) == (384, 384, 6, 0.5)
