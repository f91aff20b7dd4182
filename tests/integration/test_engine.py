"""The engine's choices: device, dtype, and the API's names for schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler

from sd_server.engine.devices import choose_device, choose_dtype, is_device_lost
from sd_server.engine.samplers import scheduler_name


@pytest.mark.parametrize(
    ("preference", "cuda", "mps", "expected"),
    [("auto", True, True, "cuda"), ("auto", False, True, "mps"), ("auto", False, False, "cpu"), ("cpu", True, False, "cpu")],
)
def test_device_is_chosen_automatically_unless_configured(preference, cuda, mps, expected):
    assert choose_device(preference, cuda_available=cuda, mps_available=mps) == expected


@pytest.mark.parametrize(
    ("preference", "device", "expected"),
    [("auto", "cuda", torch.float16), ("auto", "cpu", torch.float32), ("auto", "mps", torch.float32), ("bfloat16", "cuda", torch.bfloat16)],
)
def test_dtype_is_float16_on_cuda_and_float32_elsewhere_unless_configured(preference, device, expected):
    assert choose_dtype(preference, device) is expected


def test_a_models_own_scheduler_class_gets_its_api_name():
    assert scheduler_name(PNDMScheduler) == "pndm"
    assert scheduler_name(DDIMScheduler) == "ddim"
    assert scheduler_name(LMSDiscreteScheduler) == "LMSDiscreteScheduler"


@pytest.mark.parametrize(
    ("message", "device", "lost"),
    [
        ("CUDA error: an illegal memory access was encountered", "cuda", True),
        ("CUDA error: device-side assert triggered", "cuda", True),
        ("CUDA error: an illegal memory access was encountered", "cpu", False),
        ("mat1 and mat2 shapes cannot be multiplied", "cuda", False),
    ],
)
def test_only_errors_that_poison_the_cuda_context_count_as_a_lost_device(message, device, lost):
    assert is_device_lost(RuntimeError(message), device) is lost
