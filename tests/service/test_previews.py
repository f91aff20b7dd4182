"""Live previews: while a job runs, its progress events carry a JPEG data URL of its image every SD_PREVIEW_EVERY
steps (on the fake engine, an 8x8 picture of the image's seed colour), and A1111's /sdapi/v1/progress answers it as
current_image."""

import base64
import io

from fastapi.testclient import TestClient
from PIL import Image

from helpers import follow_events, parse_sse, poll, post_job, wait_for


def jpeg_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_progress_events_carry_a_preview_of_each_job_own_image_on_preview_steps(settings, app_factory, engine, gated, small_request):
    engine.preview_every = 2
    with TestClient(app_factory(settings)) as client:
        jobs = {post_job(client, small_request, num_inference_steps=4, seed=seed): seed for seed in (7, 200)}
        followed = {job_id: follow_events(client, f"/jobs/{job_id}/events") for job_id in jobs}
        for _, begun, _ in followed.values():
            assert begun.wait(30), "the event stream did not begin"
        gated.release(1000)
        for reader, _, _ in followed.values():
            reader.join(30)

    for job_id, seed in jobs.items():
        progress = [data for name, data in followed[job_id][2] if name == "progress"]
        assert [data["step"] for data in progress] == [1, 2, 3, 4]
        assert [data["step"] for data in progress if "preview" in data] == [2, 4]
        preview = jpeg_of(progress[1]["preview"]).convert("RGB")
        assert preview.size == (8, 8) and abs(preview.getpixel((4, 4))[0] - seed) <= 8  # its own image, not its companion's


def test_a1111_progress_answers_the_running_job_preview_as_current_image(settings, app_factory, engine, gated, small_request):
    engine.preview_every = 1
    with TestClient(app_factory(settings)) as client:
        job_id = post_job(client, small_request, num_inference_steps=3, seed=99)
        before = client.get("/sdapi/v1/progress").json()
        gated.release(1)
        during = poll(lambda: client.get("/sdapi/v1/progress").json(), lambda answer: answer["current_image"], "a preview in progress")
        gated.release(1000)
        wait_for(client, job_id)
        after = client.get("/sdapi/v1/progress").json()

    image = Image.open(io.BytesIO(base64.b64decode(during["current_image"])))
    assert before["current_image"] is None and after["current_image"] is None
    assert image.format == "JPEG" and abs(image.convert("RGB").getpixel((4, 4))[0] - 99) <= 8


def test_without_previews_progress_events_carry_none(settings, app_factory, small_request):
    with TestClient(app_factory(settings)) as client:
        job_id = post_job(client, small_request, num_inference_steps=3)
        events = parse_sse(client.get(f"/jobs/{job_id}/events").text)

    assert all("preview" not in data for name, data in events if name == "progress")
