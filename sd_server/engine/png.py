"""PNG encoding with AUTOMATIC1111-style generation parameters, so image tools read them back."""

import io
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_server.storage.png_text import with_text


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


# One "Name: value" of the last line (a value in quotes may hold commas), as A1111's own parser reads it.
PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """The ``parameters`` text read back as A1111's png-info does: Prompt, Negative prompt, then each setting of the
    last line by its name (Steps, Sampler, Seed...), values as written."""
    *prompt_lines, settings = text.strip().split("\n") if text.strip() else [""]
    if len(PARAMETER.findall(settings)) < 3:  # as A1111: a last line of fewer than 3 settings is still prompt
        prompt_lines, settings = [*prompt_lines, settings], ""
    prompt, negative, into_negative = [], [], False
    for line in prompt_lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if into_negative else prompt).append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    return parsed | {name.strip(): value.strip() for name, value in PARAMETER.findall(settings)}


def encode_png(image: Image.Image, parameters: str | None = None) -> bytes:
    """The image as PNG bytes, with ``parameters`` (when given) in a PNG text chunk of that name."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def with_parameters(png: bytes, parameters: str) -> bytes:
    """An encoded PNG with ``parameters`` added as a text chunk right after its header, without re-encoding the
    pixels."""
    return with_text(png, "parameters", parameters)
