"""Live previews: a batch's latents projected to RGB by a linear map that is fitted once per checkpoint on its own
VAE (latents of known colours: no extra model, no decode per preview), each image a small JPEG."""

import io

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

PREVIEW_SIDE = 128  # the long side of a preview, at most
FIT_SIDE = 128  # pixels of the images the projection is fitted on
BLOCK = 16  # pixels of each flat colour in them: a VAE's latent pixel covers 8


def fitting_images(count: int = 4) -> torch.Tensor:
    """Images of flat random colours (the same every time), in [-1, 1]: what the projection learns to reproduce."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(count, 3, FIT_SIDE // BLOCK, FIT_SIDE // BLOCK, generator=generator) * 2 - 1
    return colours.repeat_interleave(BLOCK, dim=2).repeat_interleave(BLOCK, dim=3)


@torch.no_grad()
def fit_projection(vae: AutoencoderKL) -> torch.Tensor:
    """The least-squares linear map (latent channels and a bias -> RGB in [-1, 1]) from the VAE's latents of flat
    colours, scaled as a pipeline's latents are, to those colours."""
    images = fitting_images()
    encoded = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu() * vae.config.scaling_factor
    colours = F.avg_pool2d(images, FIT_SIDE // encoded.shape[-1])
    latents = encoded.permute(0, 2, 3, 1).reshape(-1, encoded.shape[1])
    targets = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    with_bias = torch.cat([latents, torch.ones(len(latents), 1)], dim=1)
    return torch.linalg.lstsq(with_bias, targets).solution


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The preview's size: the image's aspect, its long side PREVIEW_SIDE (never larger than the image)."""
    scale = min(1.0, PREVIEW_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def preview_jpegs(latents: torch.Tensor, projection: torch.Tensor, width: int, height: int) -> list[bytes]:
    """Each image's latents as a small JPEG (one copy to the host for the whole batch)."""
    host = latents.detach().float().cpu()
    rgb = torch.einsum("bchw,cr->brhw", host, projection[:-1]) + projection[-1].view(1, 3, 1, 1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    size = preview_size(width, height)
    jpegs = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).resize(size, Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=70)
        jpegs.append(buffer.getvalue())
    return jpegs
