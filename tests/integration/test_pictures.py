"""A pipeline's decoded images become pictures as bytes on the device's side: the very bytes diffusers' own
conversion makes on the host."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from sd_server.engine.pictures import to_pictures


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pictures_are_the_bytes_diffusers_own_conversion_makes(dtype):
    decoded = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # a little past [-1, 1]
    decoded[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 254.5]) / 127.5 - 1  # exact halves: rounded to even
    processor = VaeImageProcessor()
    ours = to_pictures(processor.postprocess(decoded.to(dtype), output_type="pt"))
    theirs = processor.postprocess(decoded.to(dtype), output_type="pil")
    assert [picture.size for picture in ours] == [(24, 16)] * 2 and all(picture.mode == "RGB" for picture in ours)
    for index, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        assert np.array_equal(np.asarray(mine), np.asarray(reference)), f"image {index}"
