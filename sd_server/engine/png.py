"""PNG encoding with AUTOMATIC1111-style generation parameters, so image tools read them back."""

import io

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
    extras: dict[str, object] | None = None,
) -> str:
    """The ``parameters`` text that AUTOMATIC1111's web UI writes; ``extras`` (img2img's "Denoising strength",
    say) follow the model."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance_scale}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model_id}" + "".join(f", {name}: {value}" for name, value in (extras or {}).items())
    )
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    """The image as PNG bytes, with ``parameters`` in a PNG text chunk of that name."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
