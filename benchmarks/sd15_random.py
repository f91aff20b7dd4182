"""Build a full-size Stable Diffusion 1.5 pipeline with random weights from SD1.5's published configs.

The arithmetic is SD1.5's (UNet about 860M parameters), so timings are honest without downloading
weights; the images are noise. Usage: ``python benchmarks/sd15_random.py [OUTPUT_DIR]``
(default ``models/sd15-random``; about 2 GB in float16).
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sd_server.demo.vocabulary import build_tokenizer  # noqa: E402

CONFIG_DIR = Path(__file__).parent / "sd15_architecture"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "sd15-random"


def load_config(name: str) -> dict:
    """One of SD1.5's component configs, copied from runwayml/stable-diffusion-v1-5."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def build_sd15_random_pipeline(seed: int = 0, unet_seed: int | None = None) -> StableDiffusionPipeline:
    """SD1.5's UNet, VAE, CLIP text encoder and scheduler, weights drawn from ``seed``; a ``unet_seed`` gives another
    UNet with the same VAE and text encoder (a DreamBooth fine-tune of the ``seed`` model, as far as bytes go)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(load_config("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**load_config("text_encoder")))
    if unet_seed is not None:
        torch.manual_seed(unet_seed)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel.from_config(load_config("unet")),
        scheduler=PNDMScheduler.from_config(load_config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd15_random(output_dir: Path = DEFAULT_DIR, seed: int = 0, unet_seed: int | None = None) -> Path:
    """Build the pipeline and save it in float16 to ``output_dir``; returns the folder."""
    pipeline = build_sd15_random_pipeline(seed, unet_seed).to(dtype=torch.float16)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


if __name__ == "__main__":
    print(f"SD1.5-sized random pipeline written to {save_sd15_random(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)}")
