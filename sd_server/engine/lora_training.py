"""Training a user's LoRA from their photos: the diffusers DreamBooth-LoRA recipe. The photos' latents and the
caption's embedding are computed once (the VAE and the text encoder do not run per step); a peft LoRA on the UNet's
attention learns with AdamW under min-SNR-gamma weighting, optionally with offset noise, in mixed precision with
gradient checkpointing on CUDA. It runs a few steps at a time on the device worker's thread, and its whole state
(adapter, optimizer, step, random generator) saves to a checkpoint and loads back."""

import math
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from sd_server.domain.trainings import TrainingSettings
from sd_server.errors import ModelLoadError, TrainingFailedError, first_line
from sd_server.storage.model_files import checkpoint_location

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MAX_GRAD_NORM = 1.0
SAMPLE_STEPS = 20


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), for noise or velocity prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    velocity = scheduler.config.prediction_type == "v_prediction"
    return torch.clamp(snr, max=gamma) / (snr + 1 if velocity else snr)


def photo_tensor(path: Path) -> torch.Tensor:
    """A prepared photo (RGB, square, at the training's resolution) as a 1x3xHxW tensor in [-1, 1]."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


class LoraTrainer:
    """One training on the device: the base's components, the cached latents and caption, the adapter learning."""

    def __init__(
        self, location: str, photos: list[Path], settings: TrainingSettings, device: str, loading: AbstractContextManager = nullcontext()
    ) -> None:
        """``loading``: held while loading (another thread's loads at the same time could create modules on the
        meta device: the loaders patch torch while they create empty modules)."""
        self.settings, self.location, self.device, self.loading = settings, location, device, loading
        self.mixed_precision = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
        with loading:  # creating the adapter's layers is loading too
            self._load(location)
            with torch.random.fork_rng(devices=[]):  # the adapter's first weights follow the seed, on the CPU
                torch.manual_seed(settings.seed)
                self.unet.add_adapter(
                    LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
                )
            self.unet.to(device)
        self.latents = self._encode_photos(photos)
        self.caption_embedding = self._encode_caption(settings.caption_text)
        if device == "cuda":
            self.unet.enable_gradient_checkpointing()
        self.parameters = [parameter for parameter in self.unet.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate, weight_decay=1e-2)
        self.generator = torch.Generator(device).manual_seed(settings.seed)
        self.step = 0

    def _load(self, location: str) -> None:
        """The base's tokenizer, text encoder, VAE, noise schedule and UNet (fp32: the optimizer updates them)."""
        self.tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=torch.float32).requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(location, subfolder="vae", dtype=torch.float32).requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler")
        self.unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=torch.float32).requires_grad_(False)

    @torch.no_grad()
    def _encode_photos(self, photos: list[Path]) -> torch.Tensor:
        """Each photo's latent (the mean of the VAE's distribution: its spread would only teach blur), scaled as
        the UNet sees latents; encoded once."""
        self.vae.to(self.device)
        latents = [self.vae.encode(photo_tensor(path).to(self.device)).latent_dist.mean for path in photos]
        self.vae.to("cpu")  # until the samples: the device's memory is the UNet's while it trains
        return torch.cat(latents) * self.vae.config.scaling_factor

    @torch.no_grad()
    def _encode_caption(self, caption: str) -> torch.Tensor:
        """The caption's text embedding, computed once."""
        ids = self.tokenizer(
            caption, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids)[0].to(self.device)

    def run(self, steps: int) -> float:
        """Train ``steps`` steps; their mean loss. TrainingFailedError when the loss stops being a number."""
        self.unet.train()
        losses = []
        for _ in range(steps):
            loss = self._loss()
            if not math.isfinite(loss.item()):
                raise TrainingFailedError(
                    f"the loss became {loss.item()} at step {self.step + 1}; train again with a lower learning_rate"
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def _loss(self) -> torch.Tensor:
        """Min-SNR weighted denoising loss of a batch of photos noised at random timesteps."""
        batch = self.settings.batch_size
        picks = torch.randint(0, len(self.latents), (batch,), generator=self.generator, device=self.device)
        latents = self.latents[picks]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        if self.settings.noise_offset:
            offset = torch.randn((batch, latents.shape[1], 1, 1), generator=self.generator, device=self.device)
            noise = noise + self.settings.noise_offset * offset
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch,), generator=self.generator, device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device, dtype=self.mixed_precision, enabled=self.mixed_precision is not None):
            predicted = self.unet(noisy, timesteps, self.caption_embedding.expand(batch, -1, -1)).sample
        velocity = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
        per_sample = F.mse_loss(predicted.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.settings.snr_gamma:
            per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.settings.snr_gamma)
        return per_sample.mean()

    def save_checkpoint(self, path: Path) -> None:
        """Write the whole training state to ``path`` (whole or not at all)."""
        state = {
            "adapter": get_peft_model_state_dict(self.unet),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
        }
        partial = path.with_name(f".{path.name}.partial")
        torch.save(state, partial)
        os.replace(partial, path)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from the state ``save_checkpoint`` wrote."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        set_peft_model_state_dict(self.unet, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"].cpu())

    def export(self, path: Path) -> None:
        """Save the adapter in diffusers' LoRA format (``load_lora_weights`` reads it like an uploaded one)."""
        layers = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in get_peft_model_state_dict(self.unet).items()}
        StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)

    @torch.no_grad()
    def samples(self, prompts: list[str]) -> list[Image.Image]:
        """Pictures of ``prompts`` drawn with the adapter as trained so far (the base's own scheduler, fixed seeds)."""
        self.unet.eval()
        with self.loading:
            pipeline = StableDiffusionPipeline.from_pretrained(
                self.location,
                unet=self.unet,
                vae=self.vae.to(self.device),
                text_encoder=self.text_encoder.to(self.device),
                tokenizer=self.tokenizer,
                safety_checker=None,
                requires_safety_checker=False,
                dtype=torch.float32,
            )
        pipeline.set_progress_bar_config(disable=True)
        generators = [torch.Generator("cpu").manual_seed(self.settings.seed + index) for index in range(len(prompts))]
        size = self.settings.resolution
        try:
            return pipeline(prompts, num_inference_steps=SAMPLE_STEPS, width=size, height=size, generator=generators).images
        finally:
            self.vae.to("cpu")
            self.text_encoder.to("cpu")


def start_training(
    models_dir: Path, base: str, photos: list[Path], settings: TrainingSettings, device: str, loading: AbstractContextManager = nullcontext()
) -> LoraTrainer:
    """A training of a LoRA on ``base`` (a hub id, or a folder under ``models_dir``) from the prepared ``photos``;
    ModelLoadError when the base cannot be read."""
    location = checkpoint_location(models_dir, base)
    try:
        return LoraTrainer(location, photos, settings, device, loading=loading)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load base '{base}' for training", detail=first_line(error)) from error
