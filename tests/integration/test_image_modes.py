"""img2img, inpainting, prompt weights, long prompts and style presets on the tiny real pipelines: what each mode
records, what it keeps of the init image, how it batches, and the errors it answers."""

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from helpers import pixels, wait_for
from sd_server.app import create_app
from sd_server.engine.prompts import encode_tokens, weighted_tokens

FAST = {"num_inference_steps": 4, "width": 256, "height": 256, "seed": 3, "scheduler": "euler"}


def encoded(image: Image.Image) -> str:
    """A picture as a base64 PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def stripes(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """An init picture with detail everywhere: vertical stripes of three colours."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for x in range(0, size[0], 16):
        draw.rectangle((x, 0, x + 15, size[1]), fill=[(220, 40, 40), (40, 170, 60), (40, 90, 230)][(x // 16) % 3])
    return image


def square_mask(box: tuple[int, int, int, int] = (96, 96, 160, 160), size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A mask that repaints ``box`` only."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def generate(client: TestClient, **fields) -> dict:
    """POST /generate with the fast settings; its JSON (fails on any answer but 200)."""
    response = client.post("/generate", json={"prompt": "a photo of sks person", **FAST, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def png_text(image_base64: str) -> str:
    """The PNG's A1111 parameters chunk."""
    return Image.open(io.BytesIO(base64.b64decode(image_base64))).info["parameters"]


def test_img2img_records_mode_and_strength_and_runs_steps_times_strength(client):
    job_id = client.post("/jobs", json={"prompt": "a photo", **FAST, "init_image": encoded(stripes()), "strength": 0.5}).json()["job_id"]
    job = wait_for(client, job_id)

    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"step": 2, "total": 2}  # int(4 x 0.5)
    parameters = job["result"]["parameters"]
    assert (parameters["mode"], parameters["strength"], parameters["width"], parameters["height"]) == ("img2img", 0.5, 256, 256)
    image = client.get(job["result"]["image_url"])
    text = Image.open(io.BytesIO(image.content)).info["parameters"]
    assert "Mode: img2img, Denoising strength: 0.5" in text


def test_img2img_without_a_size_keeps_the_init_images_aspect_ratio(client):
    response = client.post("/generate", json={"prompt": "a photo", "num_inference_steps": 2, "init_image": encoded(stripes((300, 200))), "strength": 0.5})
    result = response.json()

    assert response.status_code == 200, response.text
    assert (result["parameters"]["width"], result["parameters"]["height"]) == (384, 256)
    assert pixels(result["image_base64"]).shape == (256, 384, 3)


def test_img2img_runs_on_the_cached_pipelines_modules_without_loading_again(client, load_calls):
    generate(client)
    generate(client, init_image=encoded(stripes()), strength=0.5)
    generate(client, init_image=encoded(stripes()), mask_image=encoded(square_mask()))

    checkpoint = client.app.state.services.engine.cache.get("demo")
    assert load_calls == [str(client.app.state.settings.models_dir / "demo")]
    assert {type(pipeline).__name__ for pipeline in checkpoint.derived.values()} == {"StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
    assert all(pipeline.unet is checkpoint.pipeline.unet and pipeline.vae is checkpoint.pipeline.vae for pipeline in checkpoint.derived.values())


@pytest.mark.parametrize("full_res", [False, True])
def test_inpainting_keeps_every_pixel_outside_the_mask_and_repaints_inside(client, full_res):
    init = stripes()
    result = generate(client, init_image=encoded(init), mask_image=encoded(square_mask()), strength=1.0, inpaint_full_res=full_res, inpaint_full_res_padding=16)
    image, original = pixels(result["image_base64"]), np.asarray(init).astype(np.int16)

    far = np.ones((256, 256), dtype=bool)
    far[80:177, 80:177] = False  # the mask, its blur and a margin
    assert np.array_equal(image[far], original[far])
    assert np.abs(image[112:144, 112:144] - original[112:144, 112:144]).mean() > 20
    assert result["parameters"] | {"mode": "inpaint", "mask_blur": 4, "inpaint_full_res": full_res} == result["parameters"]
    assert "Mask blur: 4" in png_text(result["image_base64"])


def test_an_inpainting_checkpoint_runs_text_to_image_img2img_and_inpainting_on_its_own_pipeline(settings):
    settings.user_models["ivy"] = "demo-inpainting"
    with TestClient(create_app(settings)) as client:
        plain = generate(client, user_id="ivy")
        from_image = generate(client, user_id="ivy", init_image=encoded(stripes()), strength=0.6)
        inpainted = generate(client, user_id="ivy", init_image=encoded(stripes()), mask_image=encoded(square_mask()))
        derived = client.app.state.services.engine.cache.get("demo-inpainting").derived

    assert [result["parameters"]["mode"] for result in (plain, from_image, inpainted)] == ["txt2img", "img2img", "inpaint"]
    assert list(derived) == ["StableDiffusionInpaintPipeline"]
    assert np.array_equal(pixels(inpainted["image_base64"])[:64], np.asarray(stripes())[:64].astype(np.int16))


def test_img2img_jobs_are_batched_and_each_image_equals_its_image_alone(settings):
    settings.batch_wait_ms = 300
    images = [stripes(), stripes().rotate(90), Image.new("RGB", (256, 256), (200, 200, 40))]
    with TestClient(create_app(settings)) as client:
        bodies = [{"prompt": f"photo {index}", **FAST, "init_image": encoded(image), "strength": 0.75} for index, image in enumerate(images)]
        ids = [client.post("/jobs", json=body).json()["job_id"] for body in bodies]
        batched = [wait_for(client, job_id) for job_id in ids]
        alone = [client.post("/generate", json=body).json() for body in bodies]
        batched_pixels = [pixels(base64.b64encode(client.get(job["result"]["image_url"]).content).decode()) for job in batched]

    assert [job["batch_size"] for job in batched] == [3, 3, 3]
    for mine, single in zip(batched_pixels, alone):
        assert np.abs(mine - pixels(single["image_base64"])).max() <= 2
    assert np.abs(batched_pixels[0] - batched_pixels[2]).mean() > 1  # each image started from its own picture


def test_generate_image_takes_the_init_image_and_mask_as_multipart_files(client):
    def png_file(image: Image.Image) -> bytes:
        return base64.b64decode(encoded(image))

    response = client.post(
        "/generate/image",
        data={"prompt": "a photo", "num_inference_steps": "4", "seed": "3", "strength": "0.75", "styles": ["Demo on white"]},
        files={"init_image": ("init.png", png_file(stripes()), "image/png"), "mask_image": ("mask.png", png_file(square_mask()), "image/png")},
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers["X-Seed"] == "3"
    text = Image.open(io.BytesIO(response.content)).info["parameters"]
    assert text.startswith("a photo on a white background\n") and "Mode: inpaint, Denoising strength: 0.75" in text


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"mask_image": "MASK"}, "mask_image", "needs init_image"),
        ({"init_image": "%%%"}, "init_image", "not base64"),
        ({"init_image": base64.b64encode(b"hello").decode()}, "init_image", "not an image"),
        ({"init_image": "INIT", "strength": 0.2}, "strength", "runs no step"),
        ({"styles": ["No such style"]}, "styles", "unknown style"),
    ],
)
def test_bad_image_requests_answer_422_naming_the_field(client, fields, field, words):
    images = {"INIT": encoded(stripes()), "MASK": encoded(square_mask())}
    body = {"prompt": "a photo", **FAST, **{name: images.get(value, value) if isinstance(value, str) else value for name, value in fields.items()}}

    response = client.post("/generate", json=body)

    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == field and words in detail["msg"]


def test_a_body_with_images_past_sd_max_image_body_bytes_is_413_naming_the_setting(settings):
    settings.max_image_body_bytes = 4096
    with TestClient(create_app(settings)) as client:
        response = client.post("/generate", json={"prompt": "a photo", "init_image": encoded(stripes()) * 4})

    assert response.status_code == 413 and "SD_MAX_IMAGE_BODY_BYTES" in response.json()["detail"]


def test_a_weighted_prompt_changes_the_image_and_a_plain_one_in_its_batch_does_not_change(settings):
    settings.batch_wait_ms = 300
    with TestClient(create_app(settings)) as client:
        plain_alone = generate(client, prompt="a photo of sks person")
        ids = [client.post("/jobs", json={**FAST, "prompt": prompt}).json()["job_id"] for prompt in ("(a photo:1.6) of sks person", "a photo of sks person")]
        weighted, plain_batched = (wait_for(client, job_id) for job_id in ids)
        fetch = lambda job: pixels(base64.b64encode(client.get(job["result"]["image_url"]).content).decode())  # noqa: E731

        assert weighted["batch_size"] == plain_batched["batch_size"] == 2
        assert np.abs(fetch(plain_batched) - pixels(plain_alone["image_base64"])).max() <= 2
        assert np.abs(fetch(weighted) - pixels(plain_alone["image_base64"])).mean() > 1


def test_a_plain_prompt_encodes_exactly_as_the_pipeline_encodes_it(client):
    generate(client)
    pipeline = client.app.state.services.engine.cache.get("demo").pipeline
    prompts = ["a photo of sks person", "a red circle"]

    ours = encode_tokens(pipeline, [weighted_tokens(pipeline.tokenizer, prompt) for prompt in prompts], 1)
    theirs, _ = pipeline.encode_prompt(prompts, torch.device("cpu"), 1, False)

    assert torch.equal(ours, theirs)


def test_words_past_the_text_encoders_length_still_change_the_image(client):
    tokenizer = client.app.state.services.engine.prompt_counter.tokenizer("demo")
    words = "a photo of sks person " * 3
    assert len(tokenizer(words, add_special_tokens=False).input_ids) > tokenizer.model_max_length  # two chunks or more

    first = generate(client, prompt=words)
    second = generate(client, prompt=words + "(in a red circle:1.4)")

    assert np.abs(pixels(first["image_base64"]) - pixels(second["image_base64"])).mean() > 1


def test_style_presets_are_listed_applied_in_order_and_managed_by_admins(settings):
    settings.admin_key = "admin-key-for-styles-0123456789"
    admin = {"X-API-Key": settings.admin_key}
    with TestClient(create_app(settings)) as client:
        user_key = client.post("/keys", json={"user_id": "alice"}, headers=admin).json()["key"]
        user = {"X-API-Key": user_key}
        listed = {style["name"]: style for style in client.get("/styles", headers=user).json()}
        created = client.put("/styles/Night", json={"prompt": "{prompt} at night", "negative_prompt": "day"}, headers=admin)
        replaced = client.put("/styles/Night", json={"prompt": "{prompt} at midnight", "negative_prompt": "day"}, headers=admin)
        refused = client.put("/styles/Night", json={"prompt": "x"}, headers=user)
        result = client.post("/generate", json={"prompt": "a photo", **FAST, "styles": ["Night", "Demo on white"]}, headers=user).json()
        file_delete = client.delete("/styles/Demo on white", headers=admin)
        api_delete = client.delete("/styles/Night", headers=admin)
        after = client.get("/styles/Night", headers=user)

    assert listed["Demo on white"] == {"name": "Demo on white", "prompt": "{prompt} on a white background", "negative_prompt": "", "origin": "file"}
    assert (created.status_code, replaced.status_code, refused.status_code) == (201, 200, 403)
    assert result["parameters"]["prompt"] == "a photo at midnight on a white background"
    assert result["parameters"]["negative_prompt"] == "day" and result["parameters"]["styles"] == ["Night", "Demo on white"]
    assert png_text(result["image_base64"]).startswith("a photo at midnight on a white background\nNegative prompt: day\n")
    assert (file_delete.status_code, api_delete.status_code, after.status_code) == (409, 204, 404)


def test_img2img_leaves_the_cached_modules_in_their_dtype(settings):
    settings.dtype = "bfloat16"  # as float16 on a GPU: from_pipe would cast the shared modules to float32 unless told
    with TestClient(create_app(settings)) as client:
        generate(client, init_image=encoded(stripes()), strength=0.5, num_inference_steps=2)
        checkpoint = client.app.state.services.engine.cache.get("demo")

    assert checkpoint.pipeline.unet.dtype == checkpoint.pipeline.vae.dtype == checkpoint.pipeline.text_encoder.dtype == torch.bfloat16
