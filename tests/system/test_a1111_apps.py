"""Open WebUI and SillyTavern, replayed: the requests each one sends to an AUTOMATIC1111 server (read from their code:
Open WebUI's backend/open_webui/routers/images.py, SillyTavern's src/endpoints/stable-diffusion.js), with the auth
header each builds from its settings, against a live server in open mode and with keys on. The image must reach
the app. Sent with requests (as Open WebUI sends them), which passes the empty ``Basic `` header on as it is."""

import base64
import io
from collections.abc import Callable

import httpx
import pytest
import requests
from PIL import Image

from config import Settings

ADMIN_KEY = "admin-key-for-the-a1111-app-tests-01"


def basic(auth: str) -> str:
    """The header both apps build from their "user:password" field, also when it is empty: ``Basic `` + base64."""
    return "Basic " + base64.b64encode(auth.encode()).decode()


def decoded(image: str) -> Image.Image:
    """A base64 image as the apps decode it."""
    return Image.open(io.BytesIO(base64.b64decode(image)))


class AppSession(requests.Session):
    """A requests session on the server's URL, every answer checked (an error status raises)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__()
        self.url = url
        self.headers.update(headers)

    def request(self, method, path, *args, **kwargs):  # type: ignore[override]
        response = super().request(method, self.url + path, *args, timeout=300, **kwargs)
        response.raise_for_status()
        return response


def open_webui(url: str, auth: str) -> Image.Image:
    """Open WebUI's sequence: verify the URL (options), list the models, read and set the model, then txt2img."""
    with AppSession(url, {"authorization": basic(auth)}) as http:
        http.get("/sdapi/v1/options")  # "verify connection"
        models = [{"id": model["title"], "name": model["model_name"]} for model in http.get("/sdapi/v1/sd-models").json()]
        current = http.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert current in {model["id"] for model in models}
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": current})
        response = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "batch_size": 1, "width": 256, "height": 256, "steps": 4})
        return decoded(response.json()["images"][0])


def silly_tavern(url: str, auth: str) -> Image.Image:
    """SillyTavern's sequence: ping, the upscaler, sampler, scheduler, model and VAE lists, set the model and wait
    for the queue, then txt2img with values its sliders allow (CFG 24, width 192, an SDE Karras sampler) and its
    Hires. fix toggle on."""
    with AppSession(url, {"Authorization": basic(auth)}) as http:
        http.get("/sdapi/v1/options")  # /api/sd/ping
        upscalers = [item["name"] for item in http.get("/sdapi/v1/upscalers").json()]
        upscalers += [item["name"] for item in http.get("/sdapi/v1/latent-upscale-modes").json()]
        samplers = [item["name"] for item in http.get("/sdapi/v1/samplers").json()]
        schedulers = [item["label"] for item in http.get("/sdapi/v1/schedulers").json()]
        models = [{"value": item["title"], "text": item["model_name"]} for item in http.get("/sdapi/v1/sd-models").json()]
        vaes = ["None", *(item["model_name"] for item in http.get("/sdapi/v1/sd-vae").json())]
        model = http.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": model})
        assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0  # it waits for this after setting a model
        assert "Lanczos" in upscalers and "DPM++ 2M SDE Karras" in samplers and "Karras" in schedulers
        assert model in {item["value"] for item in models} and vaes == ["None"]
        body = {
            "prompt": "a red circle", "negative_prompt": "", "sampler_name": "DPM++ 2M SDE Karras", "scheduler": "normal",
            "steps": 4, "cfg_scale": 24, "width": 192, "height": 256, "restore_faces": False, "enable_hr": True,
            "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "denoising_strength": 0.7, "clip_skip": 1,
            "seed": -1, "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "None"},
            "override_settings_restore_afterwards": True, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False,
        }  # fmt: skip
        response = http.post("/sdapi/v1/txt2img", json=body)
        return decoded(response.json()["images"][0])


APPS: dict[str, Callable[[str, str], Image.Image]] = {"open-webui": open_webui, "sillytavern": silly_tavern}
SIZES = {"open-webui": (256, 256), "sillytavern": (288, 384)}  # SillyTavern's 192x256, through hires fix x 1.5


@pytest.mark.parametrize("app", APPS)
def test_an_app_left_at_its_empty_auth_default_gets_its_image_from_a_server_in_open_mode(app, settings: Settings, live_server_factory):
    url = live_server_factory(settings)

    assert APPS[app](url, "").size == SIZES[app]


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("auth", ["user:key", "key"])
def test_an_app_with_a_key_in_its_auth_field_gets_its_image_with_keys_on(app, auth, settings: Settings, live_server_factory):
    settings.admin_key = ADMIN_KEY
    url = live_server_factory(settings)
    key = httpx.post(f"{url}/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]

    assert APPS[app](url, auth.replace("user", "alice").replace("key", key)).size == SIZES[app]


def test_with_keys_on_an_app_without_a_key_is_refused_with_401(settings: Settings, live_server_factory):
    settings.admin_key = ADMIN_KEY
    url = live_server_factory(settings)

    with pytest.raises(requests.HTTPError) as refused:
        open_webui(url, "")

    assert refused.value.response.status_code == 401
