"""The init image and mask of img2img and inpainting, as they arrive: decoded under the pixel cap, sized by a
documented rule, refused with 422 naming the field."""

import base64
import io

import pytest
from PIL import Image

from sd_server.errors import InvalidPhotoError
from sd_server.storage.source_images import decode_base64, output_size, prepare_sources


def png(size: tuple[int, int], colour: int | tuple = (200, 30, 30), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A solid picture's file bytes."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def opened(data: bytes) -> Image.Image:
    """A PNG's picture."""
    return Image.open(io.BytesIO(data))


def test_base64_images_are_taken_bare_or_as_data_urls():
    data = png((8, 8))
    encoded = base64.b64encode(data).decode()

    assert decode_base64("init_image", encoded) == data == decode_base64("init_image", f"data:image/png;base64,{encoded}")


def test_text_that_is_not_base64_is_refused_at_its_field():
    with pytest.raises(InvalidPhotoError) as refused:
        decode_base64("mask_image", "not base64 at all!")

    assert refused.value.location == ("body", "mask_image")


@pytest.mark.parametrize(
    ("size", "expected"),
    [((256, 256), (256, 256)), ((300, 200), (384, 256)), ((1000, 1000), (512, 512)), ((3024, 4032), (384, 512)), ((2000, 400), (1024, 256))],
)
def test_left_out_the_output_size_keeps_the_init_images_own_size_and_aspect_within_256_and_512(size, expected):
    assert output_size(size) == expected


def test_the_init_image_and_mask_are_stretched_to_the_requested_size_and_the_mask_made_grayscale():
    sources = prepare_sources(png((300, 200)), png((150, 100), (255, 255, 255)), (256, 320))

    assert (sources.width, sources.height) == (256, 320)
    assert opened(sources.init_png).size == opened(sources.mask_png).size == (256, 320)
    assert opened(sources.mask_png).mode == "L" and opened(sources.init_png).mode == "RGB"
    assert len(sources.init_sha256) == len(sources.mask_sha256) == 64


def test_a_jpeg_with_an_alpha_free_palette_or_a_webp_decodes_too():
    for data in (png((64, 64), fmt="JPEG"), png((64, 64), 3, mode="P"), png((64, 64), fmt="WEBP")):
        assert opened(prepare_sources(data, None, (256, 256)).init_png).mode == "RGB"


def test_an_inverted_mask_repaints_what_was_black():
    half = Image.new("L", (256, 256), 0)
    half.paste(255, (0, 0, 128, 256))
    buffer = io.BytesIO()
    half.save(buffer, format="PNG")

    mask = opened(prepare_sources(png((256, 256)), buffer.getvalue(), (256, 256), invert_mask=True).mask_png)

    assert mask.getpixel((10, 10)) == 0 and mask.getpixel((250, 10)) == 255


@pytest.mark.parametrize(
    ("init", "mask", "field", "words"),
    [
        (b"not an image", None, "init_image", "not an image"),
        (png((64, 64)), b"garbage", "mask_image", "not an image"),
        (png((64, 64)), png((64, 64), 0, mode="L"), "mask_image", "nothing to repaint"),
        (png((8000, 6000), (0, 0, 0)), None, "init_image", "megapixels"),
    ],
)
def test_images_that_do_not_decode_are_too_large_or_masks_with_nothing_to_repaint_are_refused(init, mask, field, words):
    with pytest.raises(InvalidPhotoError) as refused:
        prepare_sources(init, mask, (256, 256))

    assert refused.value.location == ("body", field) and words in refused.value.message
