"""The demo model's training is seeded and resumable: a run stopped and resumed ends with the same weights as one
that ran through, and what it exports (float16, with its plan) loads as an ordinary Stable Diffusion pipeline."""

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sd_server.demo import training

TINY_PLAN = training.TrainingPlan(vae_steps=2, decoder_steps=2, vae_batch=2, scenes=8, steps=4, batch=2, warmup=2, save_every=2)


@pytest.mark.timeout(1200)  # three short trainings, each checking its autoencoder on 69 full pictures
def test_a_resumed_training_ends_with_the_weights_of_one_that_ran_through_and_exports_a_pipeline(tmp_path):
    straight = training.train(TINY_PLAN, tmp_path / "straight", tmp_path / "work-straight")
    training.train(replace(TINY_PLAN, steps=2), tmp_path / "halfway", tmp_path / "work-resumed")  # stopped at step 2
    resumed = training.train(TINY_PLAN, tmp_path / "resumed", tmp_path / "work-resumed")

    expected, actual = (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors") for folder in (straight, resumed))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[name], actual[name]) for name in expected)
    assert {tensor.dtype for tensor in expected.values()} == {torch.float16}
    assert '"trained_steps": 4' in (straight / "training_plan.json").read_text()
    pipeline = StableDiffusionPipeline.from_pretrained(str(straight), dtype=torch.float32)
    assert pipeline("a red circle on a white background", num_inference_steps=2, width=64, height=64).images[0].size == (64, 64)
