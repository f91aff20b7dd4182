"""Smoke client for a running server: calls every endpoint and writes the images to ``test_output/``.

Usage: ``python test_api.py --url http://localhost:8000 [--steps 30 --size 512 --out test_output --api-key KEY]``
(an admin key, or SD_API_KEY, when the server requires keys).
Exits non-zero on the first endpoint that answers wrongly.
"""

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import httpx
from PIL import Image


def check(response: httpx.Response, status: int = 200) -> httpx.Response:
    """Print one line for the call; stop with its body when the status is not ``status``."""
    print(f"{response.request.method} {response.request.url.path} -> {response.status_code}")
    if response.status_code != status:
        sys.exit(f"expected {status}, got {response.status_code}: {response.text[:500]}")
    return response


def run(url: str, out: Path, steps: int, size: int, api_key: str | None) -> None:
    """Call each endpoint once and save the PNGs it returns under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    request = {"prompt": "a portrait photo of sks person", "num_inference_steps": steps, "width": size, "height": size}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=600, headers=headers) as client:
        check(client.get("/"))
        health = check(client.get("/health")).json()
        print(f"  device={health['device']} dtype={health['dtype']} version={health['version']}")
        check(client.get("/models"))
        who = check(client.get("/session")).json()
        print(f"  acting as {who['user_id'] or 'default'} ({who['role']}{', open mode' if who['open'] else ''})")
        check(client.get("/ui/"))
        check(client.get("/docs"))

        result = check(client.post("/generate", json={**request, "seed": 42, "num_images": 2})).json()
        for image in result["images"]:
            path = out / f"generate_seed{image['seed']}.png"
            path.write_bytes(base64.b64decode(image["image_base64"]))
            print(f"  wrote {path} ({result['generation_time']}s for {len(result['images'])} images)")

        response = check(client.post("/generate/image", json={**request, "seed": 7, "scheduler": "euler_a"}))
        path = out / f"generate_image_seed{response.headers['X-Seed']}.png"
        path.write_bytes(response.content)
        print(f"  wrote {path} ({response.headers['X-Generation-Time']}s)")
        verified = check(client.post("/provenance/verify", files={"image": (path.name, response.content)})).json()
        credentials = verified["credentials"] or {}
        print(f"  provenance: generated={verified['generated']} credentials={credentials.get('state')} watermark={bool(verified['watermark'])}")
        if (health.get("provenance") or {}).get("c2pa") and not (verified["generated"] and credentials.get("signature_valid")):
            sys.exit(f"the served image does not carry valid credentials, though SD_C2PA is on: {verified}")
        run_image_modes(client, request, response.content, out)

        job = run_job(client, {**request, "seed": 9})
        path = out / f"job_seed{job['result']['seed']}.png"
        path.write_bytes(check(client.get(job["result"]["image_url"])).content)
        print(f"  wrote {path} (job {job['job_id']}, batch of {job['batch_size']})")
        events = check(client.get(job["links"]["events"])).text
        print(f"  events: {events.splitlines()[0]}")
        check(client.get("/jobs", params={"limit": 5}))
        check(client.delete(f"/jobs/{job['job_id']}"), status=204)

        default_model = check(client.get("/users/default/model")).json()["model"]
        check(client.put("/users/smoke-test/model", json=default_model))
        check(client.post("/generate/image", json={**request, "user_id": "smoke-test", "seed": 7}))
        check(client.delete("/users/smoke-test/model"), status=204)
        check(client.post("/generate", json={**request, "user_id": "smoke-test"}), status=404)
        check(client.put("/users/smoke-test/model", json={"kind": "checkpoint", "source": "../outside"}), status=422)

        run_training(client, out)

        check(client.post("/generate", json={"prompt": ""}), status=422)
        check(client.post("/generate", json={**request, "user_id": "nobody-has-this-user"}), status=404)
        check(client.delete("/cache"))
    print("all endpoints answered as expected")


def run_image_modes(client: httpx.Client, request: dict, init_png: bytes, out: Path) -> None:
    """img2img (multipart), inpainting (JSON), a style preset and the A1111 API, starting from ``init_png``."""
    size = Image.open(io.BytesIO(init_png)).size
    form = {"prompt": request["prompt"], "num_inference_steps": str(request["num_inference_steps"]), "strength": "0.6", "seed": "5"}
    response = check(client.post("/generate/image", data=form, files={"init_image": ("init.png", init_png, "image/png")}))
    (out / "img2img.png").write_bytes(response.content)
    print(f"  wrote {out / 'img2img.png'} (img2img, strength 0.6)")
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    encoded = lambda data: base64.b64encode(data).decode()  # noqa: E731
    inpainting = {**request, "init_image": encoded(init_png), "mask_image": encoded(png_bytes(mask)), "strength": 1.0}
    result = check(client.post("/generate", json=inpainting)).json()
    (out / "inpainted.png").write_bytes(base64.b64decode(result["image_base64"]))
    print(f"  wrote {out / 'inpainted.png'} (mode {result['parameters']['mode']})")
    styles = check(client.get("/styles")).json()
    if styles:
        styled = check(client.post("/generate", json={**request, "styles": [styles[0]["name"]]})).json()
        print(f"  style {styles[0]['name']!r}: {styled['parameters']['prompt']!r}")
    a1111 = {"prompt": request["prompt"], "steps": request["num_inference_steps"], "width": request["width"], "height": request["height"], "seed": 3}
    txt2img = check(client.post("/sdapi/v1/txt2img", json={**a1111, "sampler_name": "Euler a"})).json()
    img2img = check(client.post("/sdapi/v1/img2img", json={**a1111, "init_images": [txt2img["images"][0]], "denoising_strength": 0.5})).json()
    (out / "a1111_img2img.png").write_bytes(base64.b64decode(img2img["images"][0]))
    print(f"  A1111 API: seeds {json.loads(txt2img['info'])['all_seeds']}, wrote {out / 'a1111_img2img.png'}")
    check(client.get("/sdapi/v1/samplers"))
    check(client.get("/sdapi/v1/progress"))


def png_bytes(image: Image.Image) -> bytes:
    """A picture's PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_job(client: httpx.Client, request: dict) -> dict:
    """POST /jobs, then poll the job until it ends; stop unless it succeeded."""
    created = check(client.post("/jobs", json=request), status=202).json()
    while (job := check(client.get(created["links"]["self"])).json())["status"] in ("queued", "running"):
        time.sleep(0.2)
    if job["status"] != "succeeded":
        sys.exit(f"job {job['job_id']} {job['status']}: {job['error']}")
    return job


def run_training(client: httpx.Client, out: Path) -> None:
    """Train a tiny LoRA (5 steps, 3 made-up photos, not activated) for a smoke-test user; save a sample, delete it."""
    photos = [("images", (f"photo-{index}.png", photo_png(index), "image/png")) for index in range(3)]
    fields = {"steps": "5", "resolution": "256", "activate": "false", "class_word": "shape", "prior_loss_weight": "0"}  # no person's photos
    created = check(client.post("/users/default/trainings", files=photos, data=fields), status=202).json()
    while (training := check(client.get(created["links"]["self"])).json())["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
    if training["status"] != "succeeded":
        sys.exit(f"training {training['training_id']} {training['status']}: {training['error']}")
    path = out / "training_sample.png"
    path.write_bytes(check(client.get(training["samples"][0])).content)
    print(f"  wrote {path} (training {training['training_id']}: LoRA {training['model']['source']})")
    check(client.delete(created["links"]["self"]), status=204)


def photo_png(index: int, size: int = 256) -> bytes:
    """A made-up photo: a coloured square on a background, in another place for each index (the server leaves out
    near-duplicates)."""
    image = Image.new("RGB", (size, size), (40 * index, 120, 200))
    left = (index * size // 5) % (size // 2)
    image.paste((230, 60 + 50 * index, 40), (left, size // 4, left + size // 2, 3 * size // 4))
    return png_bytes(image)


def main() -> None:
    """Parse the command line and run the smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--out", type=Path, default=Path("test_output"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--api-key", default=os.environ.get("SD_API_KEY"), help="an admin key, when keys are required")
    arguments = parser.parse_args()
    run(arguments.url, arguments.out, arguments.steps, arguments.size, arguments.api_key)


if __name__ == "__main__":
    main()
