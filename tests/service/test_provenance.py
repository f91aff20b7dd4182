"""Every image the service makes says it was generated: signed C2PA credentials (checked here with c2pa-python's own
reader), the IPTC digital source type in its XMP, and its A1111 parameters kept; POST /provenance/verify and the CLI
say what any image carries; each mark has its setting, shown to admins in /health. (The fake engine's pictures are
8 pixels a side, too small for the watermark: tests/integration/test_provenance.py reads it on real ones.)"""

import base64
import io
import json
import subprocess
import sys

import c2pa
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers import PROJECT_DIR, png_bytes, wait_for, with_pixels_changed, with_text_changed
from sd_server.errors import ConfigurationError
from sd_server.provenance.credentials import make_development_pair
from sd_server.provenance.metadata import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, TRAINED_ALGORITHMIC_MEDIA, XMP_KEY

ADMIN_KEY = "admin-key-for-the-provenance-tests"


def generate(client: TestClient, small_request, **fields) -> bytes:
    """One image through /generate/image, as served."""
    response = client.post("/generate/image", json=small_request(**fields))
    assert response.status_code == 200, response.text
    return response.content


def c2pa_manifest(png: bytes) -> tuple[str, dict]:
    """The validation state and active manifest c2pa-python's reader finds in ``png``."""
    with c2pa.Reader("image/png", io.BytesIO(png)) as reader:
        return reader.get_validation_state(), reader.get_active_manifest()


def actions_of(manifest: dict) -> list[dict]:
    """The actions of a manifest's actions assertion."""
    return next(assertion["data"]["actions"] for assertion in manifest["assertions"] if assertion["label"].startswith("c2pa.actions"))


def verify(client: TestClient, data: bytes, name: str = "picture.png") -> dict:
    """What /provenance/verify says of a file sent as the multipart field `image`."""
    response = client.post("/provenance/verify", files={"image": (name, data)})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_served_image_carries_signed_credentials_saying_an_ai_model_made_it(client, small_request):
    png = generate(client, small_request)

    state, manifest = c2pa_manifest(png)
    assert state == "Valid"  # signed and unchanged; the development certificate is trusted by nobody else
    created = actions_of(manifest)[0]
    assert created["action"] == "c2pa.created" and created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert manifest["claim_generator_info"][0]["name"] == "sd-server"
    assert manifest["signature_info"]["common_name"] == "sd-server development signer"
    assert not any(assertion["label"] == "org.sd-server.generation" for assertion in manifest["assertions"])  # off by default
    with Image.open(io.BytesIO(png)) as image:
        assert TRAINED_ALGORITHMIC_MEDIA in image.info[XMP_KEY]
        assert image.text["parameters"].startswith("a photo of sks person\n")  # A1111's png-info still reads it


def test_every_way_of_generating_marks_its_images(client, small_request):
    job_id = client.post("/jobs", json=small_request(num_images=2)).json()["job_id"]

    job = wait_for(client, job_id, "succeeded")
    stored = [client.get(image["url"]).content for image in job["result"]["images"]]
    inline = [base64.b64decode(image["image_base64"]) for image in client.post("/generate", json=small_request()).json()["images"]]
    a1111 = [base64.b64decode(text) for text in client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64}).json()["images"]]

    for png in stored + inline + a1111:
        assert verify(client, png)["credentials"]["signature_valid"]


def test_verify_says_what_a_served_image_carries_and_trusts_this_services_own_signer(client, small_request):
    png = generate(client, small_request)

    report = verify(client, png)

    assert report["generated"] is True
    credentials = report["credentials"]
    assert credentials["state"] == "Trusted" and credentials["trusted"] and credentials["signature_valid"]  # signed under its CA
    assert credentials["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA and credentials["generator"].startswith("sd-server ")
    assert report["metadata"]["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    assert report["watermark"] is None  # 8 pixels: too small to carry it


def test_verify_takes_the_image_as_base64_json_too(client, small_request):
    png = generate(client, small_request)

    response = client.post("/provenance/verify", json={"image": "data:image/png;base64," + base64.b64encode(png).decode()})

    assert response.status_code == 200 and response.json()["credentials"]["signature_valid"]


def test_a_changed_pixel_or_parameter_breaks_the_signature(client, small_request):
    png = generate(client, small_request)

    for tampered in (with_pixels_changed(png), with_text_changed(png, "parameters", "a different prompt\nSteps: 2, Seed: 1, Size: 8x8")):
        credentials = verify(client, tampered)["credentials"]
        assert credentials["state"] == "Invalid" and not credentials["signature_valid"]
        assert any("mismatch" in failure for failure in credentials["failures"]), credentials["failures"]


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_an_image_without_marks_is_not_called_generated_whatever_its_format(client, format):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed=3, size=64))).save(buffer, format=format)

    report = verify(client, buffer.getvalue(), f"plain.{format.lower()}")

    assert report == {"generated": False, "credentials": None, "metadata": None, "watermark": None, "watermark_confidence": report["watermark_confidence"]}
    assert report["watermark_confidence"] < 1.5


def test_verify_refuses_what_is_not_an_image_naming_the_field(client):
    not_an_image = client.post("/provenance/verify", files={"image": ("notes.txt", b"hello")})
    no_file = client.post("/provenance/verify", data={"other": "x"}, files={"unrelated": ("a.png", b"")})
    not_base64 = client.post("/provenance/verify", json={"image": "%%%"})
    no_field = client.post("/provenance/verify", json={})

    for response in (not_an_image, no_file, not_base64, no_field):
        assert response.status_code == 422, response.text
        assert "image" in json.dumps(response.json()["detail"])


def test_verify_refuses_a_body_over_the_image_cap_before_reading_it(settings, app_factory):
    settings.max_image_body_bytes = 4096
    with TestClient(app_factory(settings)) as client:
        response = client.post("/provenance/verify", files={"image": ("big.png", png_bytes(seed=1, size=128))})

    assert response.status_code == 413 and "SD_MAX_IMAGE_BODY_BYTES" in response.json()["detail"]


def test_img2img_records_a_credentialed_input_as_an_ingredient_and_inpainting_as_a_composite(client, small_request):
    signed_input = generate(client, small_request)
    plain_input = png_bytes(seed=5, size=64)
    mask = png_bytes(seed=6, size=64)

    from_signed = generate(client, small_request, init_image=base64.b64encode(signed_input).decode(), strength=0.5)
    from_plain = generate(client, small_request, init_image=base64.b64encode(plain_input).decode(), strength=0.5)
    inpainted = generate(client, small_request, init_image=base64.b64encode(plain_input).decode(), mask_image=base64.b64encode(mask).decode())

    _, manifest = c2pa_manifest(from_signed)
    assert [ingredient["relationship"] for ingredient in manifest["ingredients"]] == ["inputTo"]
    assert verify(client, from_signed)["credentials"]["ingredients"] == 1
    assert verify(client, from_plain)["credentials"]["ingredients"] == 0
    assert verify(client, inpainted)["credentials"]["digital_source_type"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA


def test_the_model_and_a_hash_of_the_parameters_are_recorded_only_when_asked(settings, app_factory, small_request):
    settings.c2pa_record_generation = True
    with TestClient(app_factory(settings)) as client:
        png = generate(client, small_request)

    _, manifest = c2pa_manifest(png)
    recorded = next(assertion["data"] for assertion in manifest["assertions"] if assertion["label"] == "org.sd-server.generation")
    assert recorded["model_id"] == "demo" and len(recorded["parameters_sha256"]) == 64


def test_each_mark_has_its_setting_and_health_shows_them_to_admins(settings, app_factory, small_request):
    settings.admin_key = ADMIN_KEY
    settings.c2pa, settings.iptc_metadata, settings.watermark = False, False, False
    with TestClient(app_factory(settings)) as client:
        png = client.post("/generate/image", json=small_request(), headers={"X-API-Key": ADMIN_KEY}).content
        health = client.get("/health", headers={"X-API-Key": ADMIN_KEY}).json()
        report = client.post("/provenance/verify", files={"image": ("a.png", png)}, headers={"X-API-Key": ADMIN_KEY}).json()

    assert health["provenance"] == {"c2pa": False, "iptc_metadata": False, "watermark": False, "watermark_service_id": settings.watermark_service_id}
    assert report["generated"] is False and report["credentials"] is None and report["metadata"] is None
    with Image.open(io.BytesIO(png)) as image:
        assert XMP_KEY not in image.info and "parameters" in image.text


def test_the_development_signing_pair_is_made_once_and_kept(settings, app_factory, small_request):
    with TestClient(app_factory(settings)) as client:
        first = c2pa_manifest(generate(client, small_request))[1]["signature_info"]["cert_serial_number"]
    with TestClient(app_factory(settings)) as client:
        second = c2pa_manifest(generate(client, small_request))[1]["signature_info"]["cert_serial_number"]

    assert first == second
    assert oct((settings.data_dir / "c2pa" / "dev-signer-key.pem").stat().st_mode & 0o777) == "0o600"


def test_the_cli_verifies_files_as_the_endpoint_does(client, small_request, settings, tmp_path):
    served, plain = tmp_path / "served.png", tmp_path / "plain.png"
    served.write_bytes(generate(client, small_request))
    plain.write_bytes(png_bytes(seed=2, size=64))
    environment = {"SD_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}

    result = subprocess.run(
        [sys.executable, "-m", "sd_server.provenance", "verify", str(served), str(plain)], cwd=PROJECT_DIR, capture_output=True, text=True, env=environment, timeout=120
    )

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1, result.stderr  # one file carries no mark
    assert lines[0]["generated"] and lines[0]["credentials"]["state"] == "Trusted"
    assert lines[1]["generated"] is False and lines[1]["file"] == str(plain)


def test_a_signing_key_that_is_not_the_certificates_stops_the_service_at_start(settings, app_factory, tmp_path):
    chain, _ = make_development_pair()
    _, other_key = make_development_pair()
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(other_key)
    settings.c2pa_cert, settings.c2pa_key = tmp_path / "chain.pem", tmp_path / "key.pem"

    with pytest.raises(ConfigurationError, match="SD_C2PA_KEY"), TestClient(app_factory(settings)):
        pass


def test_an_operators_certificate_signs_and_other_trust_anchors_are_trusted(settings, app_factory, small_request, tmp_path):
    chain, key = make_development_pair()
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    settings.c2pa_cert, settings.c2pa_key = tmp_path / "chain.pem", tmp_path / "key.pem"
    with TestClient(app_factory(settings)) as client:
        signed_by_operator = generate(client, small_request)
        health = client.get("/health").json()["provenance"]
    other = settings.model_copy(update={"c2pa_cert": None, "c2pa_key": None, "data_dir": tmp_path / "other"})
    with TestClient(app_factory(other)) as client:
        untrusted = verify(client, signed_by_operator)["credentials"]
    (tmp_path / "anchors.pem").write_bytes(chain.split(b"-----END CERTIFICATE-----\n", 1)[1])  # the operator's CA
    with TestClient(app_factory(other.model_copy(update={"c2pa_trust_anchors": tmp_path / "anchors.pem"}))) as client:
        trusted = verify(client, signed_by_operator)["credentials"]

    assert health["c2pa_development_certificate"] is False and not (settings.data_dir / "c2pa").exists()
    assert untrusted["state"] == "Valid" and "signingCredential.untrusted" in untrusted["failures"]
    assert trusted["state"] == "Trusted" and trusted["signature_valid"]
