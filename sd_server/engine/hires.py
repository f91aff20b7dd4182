"""Hires fix between its two passes: the first pass's latents upscaled in latent space, or decoded and upscaled as
pictures, at the size the second (img2img) pass runs; and where a batch is across the two passes."""

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from sd_server.domain.generation import LATENT_UPSCALERS, Hires
from sd_server.engine.pictures import to_pictures
from sd_server.storage.source_images import UPSCALERS

# A1111's latent upscalers as torch's interpolation modes, with antialiasing or not.
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
VAE_SCALE = 8  # pixels per latent, each way


@dataclass
class Passes:
    """Where a batch's denoising is: steps of the passes before this one, steps expected after it, the size this
    pass runs at (for previews), and whether the queue asked the batch to finish with what it has."""

    later: int
    width: int
    height: int
    before: int = 0
    finishing: bool = False

    def next_pass(self, steps_done: int, hires: Hires) -> None:
        """The first pass ran ``steps_done`` steps: the second runs at hires fix's size, nothing after it."""
        self.before, self.later, self.width, self.height = steps_done, 0, hires.width, hires.height


def in_latent_space(hires: Hires) -> bool:
    """True when hires fix upscales the latents (a Latent upscaler), not the decoded picture."""
    return hires.upscaler in LATENT_UPSCALERS


def upscale_latents(latents: torch.Tensor, hires: Hires) -> torch.Tensor:
    """The latents resized to hires fix's size by its latent upscaler."""
    mode, antialias = LATENT_MODES[hires.upscaler]
    size = (hires.height // VAE_SCALE, hires.width // VAE_SCALE)
    return torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)


def decode_latents(pipeline: Any, latents: torch.Tensor) -> list[Image.Image]:
    """The latents decoded by the pipeline's VAE into pictures."""
    vae = pipeline.vae
    with torch.no_grad():  # as the pipelines decode: a compiled decode is guarded on grad and inference mode
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return to_pictures(pipeline.image_processor.postprocess(pixels, output_type="pt"))


def upscale_pictures(pictures: list[Image.Image], hires: Hires) -> list[Image.Image]:
    """Pictures resized to hires fix's size by its pixel upscaler (a Latent one, on a model whose second pass needs
    pictures: Lanczos)."""
    resample = UPSCALERS.get(hires.upscaler) or Image.Resampling.LANCZOS
    return [picture.resize((hires.width, hires.height), resample) for picture in pictures]
