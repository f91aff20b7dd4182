"""An unchanged AUTOMATIC1111 client (webuiapi, as plugins and bots use it) pointed at a live server: txt2img,
img2img and inpainting through /sdapi/v1 with HTTP basic auth (the API key as password), progress and interrupt,
and the listings such clients read first."""

import threading

import httpx
import numpy as np
import pytest
import sd_backend_client
import webuiapi
from PIL import Image, ImageDraw

from config import Settings
from helpers import SLOW, poll

ADMIN_KEY = "admin-key-for-the-a1111-tests-0123"


@pytest.fixture
def a1111(settings: Settings, live_server_factory) -> tuple[str, str]:
    """A live server with keys on; its host:port, and a key of user `alice` (who runs the demo model)."""
    settings.admin_key = ADMIN_KEY
    url = live_server_factory(settings)
    key = httpx.post(f"{url}/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]
    return url, key


def client(url: str, password: str) -> webuiapi.WebUIApi:
    """webuiapi as its users make it: host, port and basic auth."""
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username="alice", password=password, steps=4)


def init_and_mask() -> tuple[Image.Image, Image.Image]:
    """An init picture with detail, and a mask of a square in its middle."""
    init = Image.new("RGB", (256, 256), (40, 90, 230))
    ImageDraw.Draw(init).ellipse((20, 20, 236, 236), fill=(220, 40, 40))
    mask = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(mask).rectangle((96, 96, 160, 160), fill=255)
    return init, mask


def test_an_a1111_client_makes_txt2img_img2img_and_inpainting_images_with_basic_auth(a1111):
    url, key = a1111
    api = client(url, key)
    init, mask = init_and_mask()

    txt = api.txt2img(prompt="a photo", seed=5, width=256, height=256, batch_size=2, sampler_name="DPM++ 2M", scheduler="Karras")
    img = api.img2img(images=[init], prompt="a photo", seed=5, width=256, height=256, denoising_strength=0.5)
    inpainted = api.img2img(images=[init], mask_image=mask, prompt="a photo", seed=5, width=256, height=256, mask_blur=2, inpaint_full_res=False)

    assert [image.size for image in txt.images] == [(256, 256), (256, 256)]
    assert txt.info["all_seeds"] == [5, 6] and "Sampler: DPM++ 2M Karras" in txt.info["infotexts"][0]
    assert img.info["denoising_strength"] == 0.5 and "Mode: img2img, Denoising strength: 0.5" in img.info["infotexts"][0]
    outside = np.ones((256, 256), dtype=bool)
    outside[80:177, 80:177] = False
    assert np.array_equal(np.asarray(inpainted.images[0].convert("RGB"))[outside], np.asarray(init)[outside])
    assert "Mode: inpaint" in inpainted.info["infotexts"][0]
    jobs = httpx.get(f"{url}/jobs", headers={"X-API-Key": key}).json()
    assert jobs["total"] == 3 and {job["user_id"] for job in jobs["jobs"]} == {"alice"}


def test_an_a1111_client_reads_samplers_models_options_and_styles(a1111):
    url, key = a1111
    api = client(url, key)

    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= {sampler["name"] for sampler in api.get_samplers()}
    assert [model["model_name"] for model in api.get_sd_models()] == ["demo"]
    assert api.get_options()["sd_model_checkpoint"] == "demo"
    assert api.set_options({"sd_model_checkpoint": "something else"}) is None
    assert "Demo on white" in {style["name"] for style in api.get_prompt_styles()}


def test_a_wrong_key_as_the_basic_auth_password_is_401(a1111):
    url, _ = a1111
    with pytest.raises(RuntimeError) as refused:
        client(url, "not-a-key").txt2img(prompt="a photo")

    assert refused.value.args[0] == 401


def test_interrupt_stops_the_callers_running_job_and_its_call_answers_the_image_made_so_far(a1111):
    url, key = a1111
    api = client(url, key)
    outcome: dict = {}

    def generate() -> None:
        outcome["result"] = api.txt2img(prompt="a photo", steps=SLOW["num_inference_steps"], width=256, height=256)

    caller = threading.Thread(target=generate)
    caller.start()
    progress = poll(api.get_progress, lambda seen: seen["progress"] > 0, "the job making progress")
    api.interrupt()
    stopping = api.get_progress()["state"]
    caller.join(timeout=300)

    assert progress["state"]["sampling_steps"] == SLOW["num_inference_steps"] and progress["state"]["job_count"] == 1
    assert [image.size for image in outcome["result"].images] == [(256, 256)]  # A1111's answer: 200, with what was made
    assert stopping["stopping_generation"] or stopping["job_count"] == 0
    job = httpx.get(f"{url}/jobs", headers={"X-API-Key": key}).json()["jobs"][0]
    assert job["status"] == "succeeded" and job["progress"]["step"] < job["progress"]["total"] == SLOW["num_inference_steps"]
    assert api.get_progress()["state"]["job_count"] == 0


def test_a1111_listings_that_clients_probe_answer_in_a1111_shapes(a1111):
    url, key = a1111
    api = client(url, key)

    assert [upscaler["name"] for upscaler in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [mode["name"] for mode in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]
    assert api.get_sd_vae() == [] and api.get_hypernetworks() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert [scheduler["label"] for scheduler in api.get_schedulers()] == ["Automatic", "Uniform", "Karras"]
    assert sorted(api.util_get_scheduler_names()) == ["automatic", "karras", "uniform"]
    assert api.get_loras() == []  # alice runs a checkpoint, not a LoRA of her own
    assert api.get_memory()["ram"]["total"] > 0 and "api" in api.get_cmd_flags()
    assert api.refresh_checkpoints() is None
    assert httpx.get(f"{url}/internal/ping").json() == {}  # open, as A1111's is


def test_extras_upscale_with_lanczos_and_png_info_reads_back_what_txt2img_wrote(a1111):
    url, key = a1111
    api = client(url, key)
    made = api.txt2img(prompt="a red circle, on white", negative_prompt="blue", seed=9, width=256, height=256, sampler_name="Euler a")

    upscaled = api.extra_single_image(made.image, upscaler_1="Lanczos", upscaling_resize=2)
    info = api.png_info(made.image)

    assert upscaled.image.size == (512, 512)
    assert info.parameters["Prompt"] == "a red circle, on white" and info.parameters["Negative prompt"] == "blue"
    assert info.parameters["Seed"] == "9" and info.parameters["Sampler"] == "Euler a" and info.parameters["Size"] == "256x256"


def backend_client(url: str, password: str):
    """IntraPaint's client (sd-backend-client) as its users make it: the URL, and credentials when asked."""
    return sd_backend_client.connect_to_backend(url, credentials_provider=lambda: ("alice", password))


def test_sd_backend_client_connects_lists_and_gets_txt2img_img2img_and_inpainting_images(a1111):
    url, key = a1111
    backend = backend_client(url, key)
    init, mask = init_and_mask()
    params = sd_backend_client.DiffusionParams(prompt="a photo", steps=4, width=256, height=256, seed=3, sampler="DPM++ 2M SDE", scheduler="karras")

    made = backend.txt2img(params)
    img2img = backend.img2img(init, request_body=params)
    inpainted = backend.img2img(init, mask=mask, request_body=params)

    assert isinstance(backend, sd_backend_client.A1111Webservice)
    assert [option.name for option in backend.list_checkpoints()] == ["demo"]
    assert {"DPM++ 2M SDE Karras", "Euler a"} <= {option.display_name for option in backend.list_samplers()}
    assert [option.display_name for option in backend.list_schedulers()] == ["Automatic", "Uniform", "Karras"]
    assert [option.name for option in backend.list_upscalers()] == ["Lanczos", "Nearest"]
    assert [image.size for image in made["images"]] == [(256, 256)] and made["info"].all_seeds == [3]
    assert "Sampler: DPM++ 2M SDE Karras" in made["info"].infotexts[0] and made["info"].sd_model_hash
    assert img2img["images"][0].size == (256, 256) and inpainted["images"][0].size == (256, 256)
    assert backend.progress_check().state.job_count == 0
