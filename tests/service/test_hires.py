"""Hires fix on the service's own API (``hires`` in /generate and /jobs): a first pass, an upscale and an img2img
pass, counted in the job's steps and cost, batched with jobs of the same hires fix only, and refused (422 naming
``hires``) with an init image, past the size range or SD_MAX_PIXEL_STEPS."""

import base64
import threading

import pytest
from fastapi.testclient import TestClient

from helpers import png_bytes, post_job, wait_for

HIRES = {"scale": 2, "upscaler": "Latent", "steps": 6, "denoising_strength": 0.5}


def test_a_hires_job_runs_both_passes_and_reports_its_hires_fix(settings, app_factory, engine, small_request):
    with TestClient(app_factory(settings)) as client:
        job = wait_for(client, post_job(client, small_request, num_inference_steps=4, width=256, height=256, hires=HIRES))

    assert job["status"] == "succeeded"
    assert job["progress"] == {"step": 4 + 3, "total": 4 + 3}  # the second pass runs int(6 x 0.5) steps
    assert job["result"]["parameters"]["hires"] == {"width": 512, "height": 512, "upscaler": "Latent", "steps": 6, "strength": 0.5}


def test_hires_jobs_batch_with_the_same_hires_fix_only(settings, app_factory, engine, small_request):
    engine.load_gate = threading.Event()  # all three queue, then batch
    with TestClient(app_factory(settings)) as client:
        jobs = [post_job(client, small_request, seed=seed, hires=HIRES) for seed in (1, 2)] + [post_job(client, small_request, seed=3)]
        engine.load_gate.set()
        statuses = [wait_for(client, job_id)["status"] for job_id in jobs]

    assert statuses == ["succeeded"] * 3
    assert sorted(engine.batch_sizes()) == [1, 2]


@pytest.mark.parametrize(
    ("hires", "words"),
    [
        ({"scale": 4}, "outside 64..2048"),
        ({"width": 4096}, "less than or equal to 2048"),
        ({"upscaler": "R-ESRGAN 4x+"}, "unknown upscaler"),
        ({"denoising_strength": 0}, "greater than 0"),
    ],
)
def test_a_hires_fix_out_of_range_is_422_naming_hires(client, small_request, hires, words):
    response = client.post("/generate", json=small_request(width=1024, height=1024, hires=hires))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", "hires"] and words in response.json()["detail"][0]["msg"]


def test_hires_fix_with_an_init_image_is_422_naming_hires(client, small_request):
    init = base64.b64encode(png_bytes(seed=1)).decode()
    response = client.post("/generate", json=small_request(init_image=init, hires=HIRES))

    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "hires"]


def test_sd_max_pixel_steps_counts_the_hires_pass_at_its_size(settings, app_factory, small_request):
    settings.max_pixel_steps = 256 * 256 * 10 + 512 * 512 * 9  # one pixel-step short of a 10-step job with hires at 512
    with TestClient(app_factory(settings)) as client:
        plain = client.post("/jobs", json=small_request(num_inference_steps=10, width=256, height=256))
        hires = client.post("/jobs", json=small_request(num_inference_steps=10, width=256, height=256, hires={"scale": 2}))

    assert plain.status_code == 202
    assert hires.status_code == 422 and "with hires fix" in hires.json()["detail"][0]["msg"]
