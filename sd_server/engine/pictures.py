"""A pipeline's decoded images as pictures: turned into bytes on the device, so the copy to the host is a quarter of
the floats' size (through pinned memory on CUDA) and the host does no float work per pixel."""

import torch
from PIL import Image


def to_pictures(images: torch.Tensor) -> list[Image.Image]:
    """Decoded images (``output_type="pt"``: images x 3 x height x width, in [0, 1]) as RGB pictures, rounded as
    diffusers' own conversion rounds (x 255 in float32, half to even)."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if pixels.is_cuda:
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream(pixels.device).synchronize()  # the pictures are needed now: one wait a batch
    else:
        host = pixels
    return [Image.fromarray(array) for array in host.numpy()]
