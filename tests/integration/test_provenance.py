"""Pictures the bundled demo model draws, served through the API, carry all three marks: credentials c2pa-python's
reader validates, the XMP source type, and a watermark that /provenance/verify reads back after JPEG 75, a 50% resize,
a 10% crop and a screenshot's re-encode (the last two leave no metadata: the watermark alone says so), naming the job."""

import io
from collections.abc import Callable, Iterator

import c2pa
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from config import Settings
from helpers import PROJECT_DIR, pixels, wait_for, with_pixels_changed
from sd_server.app import create_app
from sd_server.provenance.metadata import TRAINED_ALGORITHMIC_MEDIA

DEMO = {"num_inference_steps": 20, "width": 256, "height": 256, "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory) -> Iterator[TestClient]:
    """The app on the committed demo model."""
    folder = tmp_path_factory.mktemp("provenance")
    settings = Settings(
        _env_file=None, default_model="demo", models_dir=PROJECT_DIR / "models", output_dir=folder / "output",
        data_dir=folder / "data", preload_default_model=False, rate_limit=None, read_rate_limit=None,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def served(demo_client) -> tuple[list[str], list[bytes]]:
    """A job of two demo pictures: the fingerprints the job shows for them, and the PNGs as served."""
    job_id = demo_client.post("/jobs", json={"prompt": "a green triangle on a black background", "seed": 4, "num_images": 2, **DEMO}).json()["job_id"]
    images = wait_for(demo_client, job_id, "succeeded")["result"]["images"]
    return [image["watermark_fingerprint"] for image in images], [demo_client.get(image["url"]).content for image in images]


def reencoded(png: bytes, change: Callable[[Image.Image], Image.Image], format: str, **options) -> bytes:
    """The picture changed, then saved afresh in ``format`` (its metadata gone, as sharing leaves it)."""
    image = change(Image.open(io.BytesIO(png)).convert("RGB"))
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


SHARING = {
    "JPEG 75": lambda png: reencoded(png, lambda image: image, "JPEG", quality=75),
    "50% resize": lambda png: reencoded(png, lambda image: image.resize((image.width // 2, image.height // 2)), "PNG"),
    "10% crop": lambda png: reencoded(png, lambda image: image.crop((13, 13, image.width - 13, image.height - 13)), "PNG"),
    "screenshot PNG": lambda png: reencoded(png, lambda image: image.convert("RGBA"), "PNG"),
}


def verify(client: TestClient, data: bytes) -> dict:
    response = client.post("/provenance/verify", files={"image": ("picture", data)})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_served_pictures_credentials_validate_with_c2pas_own_reader(served):
    _, pngs = served

    for png in pngs:
        with c2pa.Reader("image/png", io.BytesIO(png)) as reader:
            assert reader.get_validation_state() == "Valid"
            actions = next(a["data"]["actions"] for a in reader.get_active_manifest()["assertions"] if a["label"].startswith("c2pa.actions"))
        assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA


def test_the_watermark_names_the_service_and_the_picture_as_its_job_shows_it(demo_client, served):
    fingerprints, pngs = served

    marks = [verify(demo_client, png)["watermark"] for png in pngs]

    assert [(mark["this_service"], mark["fingerprint"]) for mark in marks] == [(True, fingerprints[0]), (True, fingerprints[1])]
    assert fingerprints[0] != fingerprints[1]  # each picture its own (its seed differs)


def test_the_same_request_and_seed_make_the_same_marked_pixels(demo_client, served):
    fingerprints, pngs = served
    again = demo_client.post("/generate", json={"prompt": "a green triangle on a black background", "seed": 4, "num_images": 2, **DEMO}).json()["images"]

    assert [image["watermark_fingerprint"] for image in again] == fingerprints
    for image, png in zip(again, pngs):
        assert np.array_equal(pixels(image["image_base64"]), np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


@pytest.mark.parametrize("sharing", SHARING)
def test_the_watermark_survives_what_sharing_does_and_alone_says_the_picture_is_generated(demo_client, served, sharing):
    fingerprints, pngs = served

    report = verify(demo_client, SHARING[sharing](pngs[0]))

    assert report["credentials"] is None and report["metadata"] is None  # re-encoded: the metadata is gone
    assert report["generated"] is True and report["watermark"]["fingerprint"] == fingerprints[0], report


def test_a_tampered_picture_fails_its_signature_but_keeps_its_watermark(demo_client, served):
    fingerprints, pngs = served

    report = verify(demo_client, with_pixels_changed(pngs[0]))

    assert report["credentials"]["signature_valid"] is False and report["credentials"]["state"] == "Invalid"
    assert report["watermark"]["fingerprint"] == fingerprints[0]
