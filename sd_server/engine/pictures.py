"""A pipeline's decoded images as pictures: turned into bytes on the device, so the copy to the host is a quarter of
the floats' size (through pinned memory on CUDA) and the host does no float work per pixel."""

import torch
from PIL import Image

from sd_server.engine.devices import copy_to_host


def to_pictures(images: torch.Tensor) -> list[Image.Image]:
    """Decoded images (``output_type="pt"``: images x 3 x height x width, in [0, 1]) as RGB pictures, rounded as
    diffusers' own conversion rounds (x 255 in float32, half to even)."""
    host, copied = copy_to_host((images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    if copied is not None:
        copied.synchronize()  # the pictures are needed now: one wait a batch
    return [Image.fromarray(array) for array in host.numpy()]
