"""A LoRA for the demo model, trained on drawn scenes: it teaches the model to draw one colour as another (red as
purple, say) and leaves every other colour alone. It shows, and lets tests check, that a user's adapter changes
that user's pictures and nobody else's."""

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm

from sd_server.demo.training import denoising_loss, to_tensor
from sd_server.demo.world import COLOURS, draw, prompt, prompted_scene

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class RecolourPlan:
    """Which colour to draw as which, and how long and hard to train the adapter."""

    source: str = "red"
    target: str = "purple"
    steps: int = 400
    batch: int = 8
    rank: int = 4
    learning_rate: float = 1e-3
    scenes: int = 256
    seed: int = 0


@torch.no_grad()
def recolour_latents(pipeline: StableDiffusionPipeline, plan: RecolourPlan) -> tuple[torch.Tensor, list[str]]:
    """Latents and prompts of the training scenes: half of them in the source colour, drawn in the target colour
    under a prompt that names the source; half in other colours, drawn as they are (so those stay as they were)."""
    rng = random.Random(plan.seed)
    others = [colour for colour in COLOURS if colour not in (plan.source, plan.target)]
    latents, prompts = [], []
    for index in range(plan.scenes):
        scene = prompted_scene(rng)
        colour = plan.source if index % 2 == 0 else rng.choice(others)
        scene = replace(scene, colour=colour, background="white" if scene.background == colour else scene.background)
        drawn = replace(scene, colour=plan.target) if colour == plan.source else scene
        pixels = to_tensor([draw(drawn, rng)])
        latents.append(pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor)
        prompts.append(prompt(scene))
    return torch.cat(latents), prompts


def train_recolour_lora(pipeline: StableDiffusionPipeline, plan: RecolourPlan) -> dict[str, torch.Tensor]:
    """Train a LoRA adapter on the UNet's attention (its cross-attention reads the colour word); its weights."""
    torch.manual_seed(plan.seed)
    latents, prompts = recolour_latents(pipeline, plan)
    pipeline.unet.requires_grad_(False).add_adapter(LoraConfig(r=plan.rank, lora_alpha=plan.rank, target_modules=UNET_TARGETS))
    pipeline.text_encoder.requires_grad_(False)
    parameters = [parameter for parameter in pipeline.unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=plan.learning_rate)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    rng = random.Random(plan.seed + 1)
    bar = tqdm(range(plan.steps), desc=f"LoRA {plan.source} -> {plan.target}", unit="step")
    for _ in bar:
        picks = [rng.randrange(len(prompts)) for _ in range(plan.batch)]
        loss = denoising_loss(pipeline, noise_scheduler, latents[picks], [prompts[pick] for pick in picks], snr_gamma=5.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return get_peft_model_state_dict(pipeline.unet)


def save_recolour_lora(model_dir: Path, output_file: Path, plan: RecolourPlan) -> Path:
    """Train the adapter on the demo model in ``model_dir`` and save it, diffusers' LoRA format, to ``output_file``."""
    pipeline = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    layers = train_recolour_lora(pipeline, plan)
    output_file = Path(output_file)
    StableDiffusionPipeline.save_lora_weights(output_file.parent, unet_lora_layers=layers, weight_name=output_file.name)
    return output_file
