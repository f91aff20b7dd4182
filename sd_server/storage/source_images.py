"""The images an img2img or inpainting request starts from: decoded under the pixel cap, upright, RGB (the mask
grayscale, white = repaint, inverted on request), and stretched to the output size, as AUTOMATIC1111's "just
resize" does. Kept as PNGs, named by their SHA-256."""

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from sd_server.errors import InvalidPhotoError
from sd_server.storage.photos import image_size, open_upright, opened

NATIVE_SIDE = 512  # SD1.5's own size: an output that follows the init image is at most this on its longer side
MIN_SIDE, MAX_SIDE = 256, 1024  # an init image's own size is brought within these when the request names no size


@dataclass(frozen=True)
class SourceImages:
    """An init image (and mask) ready to run: PNGs at the output size, and that size."""

    init_png: bytes
    mask_png: bytes | None
    width: int
    height: int

    @property
    def init_sha256(self) -> str:
        """The init image's SHA-256 (what the job records and an idempotency fingerprint hashes)."""
        return hashlib.sha256(self.init_png).hexdigest()

    @property
    def mask_sha256(self) -> str | None:
        """The mask's SHA-256, if there is one."""
        return hashlib.sha256(self.mask_png).hexdigest() if self.mask_png else None


def base64_payload(value: str) -> str:
    """The base64 of an image sent bare or as a ``data:image/...;base64,`` URL (a ``data:`` URL without its comma
    has none: the empty string)."""
    return value.partition(",")[2] if value.startswith("data:") else value


def decode_base64(field: str, value: str) -> bytes:
    """The bytes of a base64 image, bare or as a ``data:`` URL; 422 at ``field`` when it is not base64."""
    try:
        data = base64.b64decode(base64_payload(value), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidPhotoError(f"{field}: not base64 (send the PNG or JPEG base64-encoded, or as a data: URL)", field=field) from error
    if not data:
        raise InvalidPhotoError(f"{field}: empty (a data: URL needs its comma and the base64 after it)", field=field)
    return data


def output_size(size: tuple[int, int]) -> tuple[int, int]:
    """The output size that follows an init image of ``size``: its own, scaled down to NATIVE_SIDE on the longer side
    if larger and up to MIN_SIDE on the shorter side if smaller; each side a multiple of 8 within MIN_SIDE..MAX_SIDE."""
    scale = max(MIN_SIDE / min(size), min(1.0, NATIVE_SIDE / max(size)))
    return tuple(min(MAX_SIDE, max(MIN_SIDE, round(side * scale / 8) * 8)) for side in size)  # type: ignore[return-value]


def prepare_sources(
    init_image: bytes, mask_image: bytes | None, size: tuple[int, int] | None, invert_mask: bool = False
) -> SourceImages:
    """The init image and mask stretched to ``size`` (None: ``output_size`` of the init image) as PNGs; 422 naming
    the field for one that does not decode, is over the pixel cap, or a mask with nothing to repaint. Both headers
    are checked before either image is decoded."""
    if mask_image is not None:
        image_size("mask_image", mask_image, field="mask_image")
    init = open_upright("init_image", init_image, field="init_image", fits=(max(size),) * 2 if size else None)
    width, height = size or output_size(init.size)
    mask_png = None
    if mask_image is not None:
        mask = open_upright("mask_image", mask_image, field="mask_image", fits=(max(width, height),) * 2).convert("L")
        mask = ImageOps.invert(mask) if invert_mask else mask
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        if mask.getextrema()[1] < 128:
            raise InvalidPhotoError("mask_image: nothing to repaint; white (or light) pixels mark what to repaint", field="mask_image")
        mask_png = png_bytes(mask)
    return SourceImages(png_bytes(init.resize((width, height), Image.Resampling.LANCZOS)), mask_png, width, height)


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# The upscalers the service has (A1111's names): plain resampling, no upscaling model.
UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def resized_png(data: bytes, field: str, size: tuple[int, int], upscaler: str) -> bytes:
    """The image in ``data`` resized to ``size`` by ``upscaler`` (None: left at its own size) as a PNG; 422 naming
    ``field`` when it does not decode or is over the pixel cap (checked from its header first)."""
    image = open_upright(field, data, field=field)
    resample = UPSCALERS[upscaler]
    return png_bytes(image if resample is None else image.resize(size, resample))


def text_chunks(data: bytes, field: str) -> dict[str, str]:
    """The text an image file carries (a PNG's text chunks, as A1111's ``parameters``), read without decoding its
    pixels; 422 naming ``field`` when it is not an image."""
    with opened(field, data, field) as image:
        return {key: value for key, value in image.info.items() if isinstance(value, str)}
