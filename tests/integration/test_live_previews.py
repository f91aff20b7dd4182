"""Live previews on the engine's side: each image's latents projected to a small JPEG of its own colours, made
without waiting for the device. A preview is handed out once its bytes are on the host, with the progress of the
first step that finds them there (at once on a CPU device), and a newer preview takes the place of one still copying."""

import io

import numpy as np
import torch
from PIL import Image

from sd_server.engine.previews import LivePreviews

# Latent channels 0-2 straight to red, green and blue; channel 3 to nothing; no bias.
PROJECTION = torch.cat([torch.eye(3), torch.zeros(1, 3), torch.zeros(1, 3)])


class CopyInFlight:
    """What a CUDA event of a copy not yet done answers (a CPU device has no copies in flight)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def flat_latents(*colours: tuple[float, float, float]) -> torch.Tensor:
    """Latents of 8x4 pixels, one image per colour (each channel in [-1, 1])."""
    return torch.stack([torch.tensor([*colour, 0.0]).view(4, 1, 1).expand(4, 4, 8) for colour in colours])


def rgb(jpeg: bytes) -> tuple[Image.Image, np.ndarray]:
    """The JPEG and its mean colour."""
    image = Image.open(io.BytesIO(jpeg))
    return image, np.asarray(image.convert("RGB"), dtype=float).mean(axis=(0, 1))


def test_a_preview_is_each_images_own_colours_as_a_small_jpeg_handed_out_once():
    previews = LivePreviews()
    assert previews.take() is None, "nothing started"
    previews.start(flat_latents((1.0, -1.0, -1.0), (-1.0, 0.0, 1.0)), PROJECTION, 512, 256)
    jpegs = previews.take()
    assert jpegs is not None and len(jpegs) == 2
    (red, red_mean), (blue, blue_mean) = rgb(jpegs[0]), rgb(jpegs[1])
    assert red.format == "JPEG" and red.size == blue.size == (128, 64), "the picture's aspect, 128 pixels on its long side"
    assert np.allclose(red_mean, [255, 0, 0], atol=6), red_mean
    assert np.allclose(blue_mean, [0, 128, 255], atol=6), blue_mean
    assert previews.take() is None, "handed out once"


def test_a_preview_still_copying_waits_and_a_newer_one_takes_its_place():
    previews = LivePreviews()
    previews.start(flat_latents((1.0, -1.0, -1.0)), PROJECTION, 64, 64)
    previews.pending.copied = older = CopyInFlight()
    assert previews.take() is None, "its bytes are not on the host yet"
    previews.start(flat_latents((-1.0, 1.0, -1.0)), PROJECTION, 64, 64)
    previews.pending.copied = newer = CopyInFlight()
    older.done = True
    assert previews.take() is None, "the older copy gave way to the newer, still in flight"
    newer.done = True
    jpegs = previews.take()
    assert jpegs is not None and np.allclose(rgb(jpegs[0])[1], [0, 255, 0], atol=6), "the newer preview's colours"
