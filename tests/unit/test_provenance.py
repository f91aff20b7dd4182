"""The provenance marks on their own: the watermark's code and its survival of what sharing does, on demo-world
pictures (flat colours, the hardest case for a mark in the pixels); the XMP packet; the signing pair's checks."""

import io
import random

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from PIL import Image
from skimage.data import astronaut

from sd_server.demo.world import draw, evaluation_scenes
from sd_server.errors import ConfigurationError
from sd_server.provenance import watermark
from sd_server.provenance.credentials import load_identity, make_development_pair
from sd_server.provenance.metadata import TRAINED_ALGORITHMIC_MEDIA, read_xmp, xmp_packet
from sd_server.provenance.watermark import WatermarkPayload

PAYLOAD = WatermarkPayload(service_id=23901, fingerprint="3f2a9c1e07")
STRENGTH = 2.0


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    """Demo-world pictures of varied shapes, colours and backgrounds (black and white ones among them)."""
    rng = random.Random(seed)
    return [draw(scene, rng) for scene in evaluation_scenes(count, seed)]


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def screenshot(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGBA").save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


TRANSFORMS = {
    "JPEG 75": jpeg,
    "50% resize": lambda image: image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC),
    "10% crop": lambda image: image.crop((image.width // 20, image.height // 20, image.width - image.width // 20, image.height - image.height // 20)),
    "10% off the left only": lambda image: image.crop((image.width // 10, 0, image.width, image.height)),
    "screenshot PNG": screenshot,
    "upscaled to 512": lambda image: image.resize((512, 512), Image.Resampling.BICUBIC),
}


def test_the_code_carries_the_service_and_the_fingerprint_and_any_flipped_bit_is_caught():
    code = PAYLOAD.code()

    assert len(code) == watermark.CODE_BITS and WatermarkPayload.from_code(code) == PAYLOAD
    for bit in range(watermark.CODE_BITS):
        flipped = code.copy()
        flipped[bit] ^= 1
        assert WatermarkPayload.from_code(flipped) is None, bit


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_watermark_is_read_back_after_what_sharing_does(transform):
    marked = [watermark.embed(picture, PAYLOAD, STRENGTH) for picture in pictures(8)]

    readings = [watermark.read(TRANSFORMS[transform](picture)) for picture in marked]

    assert [reading.payload for reading in readings] == [PAYLOAD] * 8, [round(reading.confidence, 2) for reading in readings]


def test_pictures_of_other_sizes_and_shapes_carry_it_too():
    for size in ((512, 512), (384, 256), (128, 192)):
        picture = pictures(1, seed=sum(size))[0].resize(size)

        assert watermark.read(jpeg(watermark.embed(picture, PAYLOAD, STRENGTH))).payload == PAYLOAD, size


@pytest.mark.timeout(300)  # 20 full crop searches, up to 1.7 s each on an idle core and several times that on a busy one
def test_unmarked_pictures_read_as_unmarked():
    readings = [watermark.read(picture) for picture in pictures(20, seed=7)]

    assert all(reading.payload is None for reading in readings)
    assert max(reading.confidence for reading in readings) < 1.5  # marked ones read 3 and more


def test_the_mark_is_faint_and_hides_in_a_photographs_colour():
    flat = pictures(4, seed=3)
    photograph = Image.fromarray(astronaut()).resize((512, 512))

    psnr = {}
    for name, picture in [*((f"demo {index}", picture) for index, picture in enumerate(flat)), ("photograph", photograph)]:
        error = np.mean((np.asarray(picture, float) - np.asarray(watermark.embed(picture, PAYLOAD, STRENGTH), float)) ** 2)
        psnr[name] = 10 * np.log10(255**2 / error)
    assert min(psnr.values()) > 35, psnr
    assert watermark.read(watermark.embed(photograph, PAYLOAD, STRENGTH)).channel == "Cb"  # flat demo colours: "Y"


def test_only_the_region_given_changes_and_the_mark_is_read_from_it():
    picture = pictures(1, seed=5)[0]
    region = Image.new("L", picture.size, 0)
    region.paste(255, (0, 0, picture.width // 2, picture.height))  # the left half repainted

    marked = watermark.embed(picture, PAYLOAD, STRENGTH, region)

    kept = np.asarray(region) == 0
    assert np.array_equal(np.asarray(marked)[kept], np.asarray(picture)[kept])
    assert watermark.read(jpeg(marked)).payload == PAYLOAD


def test_the_xmp_packet_names_the_source_type_and_the_tool_in_either_form():
    packet = xmp_packet(TRAINED_ALGORITHMIC_MEDIA, 'sd-server "0.6"')
    element_form = "<Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture</Iptc4xmpExt:DigitalSourceType>"

    assert read_xmp(packet) == (TRAINED_ALGORITHMIC_MEDIA, 'sd-server "0.6"')
    assert read_xmp(element_form) == ("http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture", None)
    assert read_xmp("<x:xmpmeta/>") == (None, None)


def test_an_operators_pair_is_used_as_given(tmp_path):
    chain, key = make_development_pair()
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)

    identity = load_identity(tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "unused")

    assert not identity.development and identity.common_name == "sd-server development signer"
    assert not (tmp_path / "unused").exists()


def test_a_signing_pair_that_does_not_belong_together_stops_the_service_naming_the_setting(tmp_path):
    chain, _ = make_development_pair()
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "other.pem").write_bytes(other_key)
    (tmp_path / "junk.pem").write_bytes(b"not a key")

    with pytest.raises(ConfigurationError, match="SD_C2PA_KEY is not the key"):
        load_identity(tmp_path / "chain.pem", tmp_path / "other.pem", tmp_path)
    with pytest.raises(ConfigurationError, match="SD_C2PA_CERT"):
        load_identity(tmp_path / "chain.pem", tmp_path / "junk.pem", tmp_path)
    with pytest.raises(ConfigurationError, match="go together"):
        load_identity(tmp_path / "chain.pem", None, tmp_path)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_identity(tmp_path / "missing.pem", tmp_path / "other.pem", tmp_path)
