"""PNG encoding with A1111-style generation parameters, and unique image names."""

import io
import secrets
from datetime import datetime, timezone

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model_id: str,
) -> str:
    """The ``parameters`` text that AUTOMATIC1111's web UI writes, so image tools can read it back."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance_scale}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model_id}"
    )
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    """The image as PNG bytes, with ``parameters`` in a PNG text chunk of that name."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_name(seed: int) -> str:
    """A new unique, unguessable file name for an image: time, seed, and 128 random bits."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{seed}_{secrets.token_hex(16)}.png"
