"""Live previews: a batch's latents projected to RGB by a linear map that is fitted once per checkpoint on its own
VAE (latents of known colours: no extra model, no decode per preview), each image a small JPEG. The projection runs
on the device and its bytes come back without stalling the steps that follow."""

import io

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from sd_server.engine.devices import copy_to_host

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


def latent_pixels(latents: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Each image's latents projected to RGB: (images, height, width, 3) bytes, on the latents' device."""
    projection = projection.to(latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float(), projection[:-1]) + projection[-1]
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PreviewCopy:
    """One preview step's pixels on their way to the host: projected on the device, then copied into pinned memory
    without waiting for the device (on CUDA; elsewhere the pixels are there at once)."""

    def __init__(self, latents: torch.Tensor, projection: torch.Tensor, width: int, height: int) -> None:
        self.host, self.copied = copy_to_host(latent_pixels(latents, projection))
        self.size = preview_size(width, height)

    def ready(self) -> bool:
        """True once the pixels are on the host (asking does not wait)."""
        return self.copied is None or self.copied.query()

    def jpegs(self) -> list[bytes]:
        """Each image as a small JPEG. Call when ``ready()``."""
        jpegs = []
        for array in self.host.numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).resize(self.size, Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=70)
            jpegs.append(buffer.getvalue())
        return jpegs


class LivePreviews:
    """A batch's previews, made without a device sync: each is started on a preview step and handed out with the
    first step after it whose progress finds its copy done (on a CPU device, its own step's). One still copying at the
    next preview step gives way to the newer one."""

    def __init__(self) -> None:
        self.pending: PreviewCopy | None = None

    def start(self, latents: torch.Tensor, projection: torch.Tensor, width: int, height: int) -> None:
        """Start the preview of ``latents`` (pictures of ``width`` x ``height``)."""
        self.pending = PreviewCopy(latents, projection, width, height)

    def take(self) -> list[bytes] | None:
        """The JPEGs of the started preview once its copy is done; None before that, or when none is started."""
        if self.pending is None or not self.pending.ready():
            return None
        done, self.pending = self.pending, None
        return done.jpegs()
