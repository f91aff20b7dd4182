"""Training a user's LoRA from their photos: the diffusers DreamBooth-LoRA recipe. The photos' latents and the
caption's embedding are computed once (the VAE and the text encoder do not run per step); a peft LoRA on the UNet's
attention learns with AdamW under min-SNR-gamma weighting, optionally with offset noise and with prior preservation
(the base's own pictures of the class, drawn a few at a time and cached). On a GPU the frozen weights are bf16 and
the adapter fp32, AdamW fused, gradient checkpointing on only when memory is short. It runs a few steps at a time
on the device worker's thread, and its whole state (adapter, optimizer, step, random generator) saves to a
checkpoint and loads back."""

import hashlib
import math
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
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
ACTIVATION_BYTES_AT_512 = 6 * 1024**3  # SD1.5's UNet, one 512x512 sample, bf16, no checkpointing
MEMORY_MARGIN_BYTES = 4 * 1024**3
CLASS_IMAGES_FOLDER = ".class-images"
DRAW_BATCH = 8  # pictures a pipeline call draws (samples, class pictures)


def training_precision(device: str) -> torch.dtype:
    """The dtype of a training's frozen weights, which its steps and pictures run in (the adapter learns in fp32):
    bf16 on a GPU that has it, else fp32."""
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def short_of_memory(settings: TrainingSettings) -> bool:
    """True when the GPU's free memory may not hold the UNet's activations for a step (so gradient checkpointing
    trades a third more time for most of that memory)."""
    samples = settings.batch_size * (2 if settings.prior_loss_weight else 1)
    needed = ACTIVATION_BYTES_AT_512 * samples * (settings.resolution / 512) ** 2 + MEMORY_MARGIN_BYTES
    free, _ = torch.cuda.mem_get_info()
    return free < needed


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
        self,
        location: str,
        photos: list[Path],
        settings: TrainingSettings,
        device: str,
        loading: AbstractContextManager = nullcontext(),
        class_images_dir: Path | None = None,
    ) -> None:
        """``loading``: held while loading (another thread's loads at the same time could create modules on the
        meta device: the loaders patch torch while they create empty modules). ``class_images_dir``: where the
        base's pictures of the class are cached for prior preservation (kept across trainings)."""
        self.settings, self.location, self.device, self.loading = settings, location, device, loading
        self.frozen_dtype = training_precision(device)
        with loading:  # creating the adapter's layers is loading too
            self._load(location)
            with torch.random.fork_rng(devices=[]):  # the adapter's first weights follow the seed, on the CPU
                torch.manual_seed(settings.seed)
                self.unet.add_adapter(
                    LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
                )
            cast_training_params(self.unet, dtype=torch.float32)  # the adapter learns in fp32 beside bf16 frozen weights
            self.unet.to(device)
        self.latents = self._encode_photos(photos)
        self.class_pictures = self._class_picture_paths(class_images_dir) if settings.prior_loss_weight and class_images_dir else []
        self.class_latents: torch.Tensor | None = None
        self.caption_embedding, self.class_embedding = self._encode_prompts([settings.caption_text, settings.class_prompt])
        self.gradient_checkpointing = device == "cuda" and short_of_memory(settings)
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.parameters = [parameter for parameter in self.unet.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate, weight_decay=1e-2, fused=device == "cuda")
        self.generator = torch.Generator(device).manual_seed(settings.seed)
        self.step = 0

    def _load(self, location: str) -> None:
        """The base's tokenizer, text encoder, VAE, noise schedule and UNet, their weights in the frozen dtype."""
        self.tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        dtype = self.frozen_dtype
        self.text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=dtype).requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(location, subfolder="vae", dtype=dtype).requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler")
        self.unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=dtype).requires_grad_(False)

    def _class_picture_paths(self, cache_dir: Path) -> list[Path]:
        """Where the base's own pictures of the class prompt (prior preservation's regularisation images) are kept:
        drawn once for a base, prompt, resolution and count, then read from ``cache_dir``."""
        settings = self.settings
        key = hashlib.sha256(f"{self.location}|{settings.class_prompt}|{settings.resolution}|{settings.class_images}".encode()).hexdigest()[:16]
        return [cache_dir / key / f"{index:03d}.png" for index in range(settings.class_images)]

    def prepare(self) -> bool:
        """Draw the next DRAW_BATCH class pictures not yet kept (the base's own: the adapter off), one call, so a
        generation waits at most that long; once all are there, encode them. True when ready to train."""
        missing = [path for path in self.class_pictures if not path.is_file()][:DRAW_BATCH]
        if missing:
            self.unet.disable_adapters()  # a resumed training's adapter has learned: the class pictures are the base's
            try:
                pictures = self._draw([self.settings.class_prompt] * len(missing), seeds=[int(path.stem) for path in missing])
            finally:
                self.unet.enable_adapters()
            missing[0].parent.mkdir(parents=True, exist_ok=True)
            for path, picture in zip(missing, pictures):
                partial = path.with_name(f".{path.name}.partial")
                picture.save(partial, format="PNG")
                os.replace(partial, path)
            return False
        if self.class_pictures and self.class_latents is None:
            self.class_latents = self._encode_photos(self.class_pictures)
        return True

    @torch.no_grad()
    def _encode_photos(self, photos: list[Path]) -> torch.Tensor:
        """Each photo's latent (the mean of the VAE's distribution: its spread would only teach blur), scaled as
        the UNet sees latents; encoded once."""
        self.vae.to(self.device)
        latents = [self.vae.encode(photo_tensor(path).to(self.device, self.frozen_dtype)).latent_dist.mean for path in photos]
        self.vae.to("cpu")  # until the samples: the device's memory is the UNet's while it trains
        return torch.cat(latents).float() * self.vae.config.scaling_factor  # noised in fp32

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's text embedding (1 x tokens x features), computed once."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return list(self.text_encoder(ids)[0].to(self.device).split(1))

    def run(self, steps: int) -> float:
        """Train ``steps`` steps (after ``prepare`` answered True); their mean loss. TrainingFailedError when the
        loss stops being a number."""
        assert self.class_latents is not None or not self.class_pictures, "prepare() until it answers True, then run()"
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
        """Min-SNR weighted denoising loss of a batch of photos noised at random timesteps; with prior preservation,
        plus ``prior_loss_weight`` times that of as many of the base's class pictures, with the class prompt."""
        batch = self.settings.batch_size
        latents, embeddings = self._pick(self.latents, self.caption_embedding, batch)
        if self.class_latents is not None:
            class_latents, class_embeddings = self._pick(self.class_latents, self.class_embedding, batch)
            latents, embeddings = torch.cat([latents, class_latents]), torch.cat([embeddings, class_embeddings])
        per_sample = self._denoising_losses(latents, embeddings)
        if self.class_latents is None:
            return per_sample.mean()
        return per_sample[:batch].mean() + self.settings.prior_loss_weight * per_sample[batch:].mean()

    def _pick(self, latents: torch.Tensor, embedding: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` latents drawn at random (with replacement), and the embedding repeated for each."""
        picks = torch.randint(0, len(latents), (batch,), generator=self.generator, device=self.device)
        return latents[picks], embedding.expand(batch, -1, -1)

    def _denoising_losses(self, latents: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Each latent's min-SNR weighted loss, noised at a random timestep and predicted given its embedding."""
        batch = len(latents)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        if self.settings.noise_offset:
            offset = torch.randn((batch, latents.shape[1], 1, 1), generator=self.generator, device=self.device)
            noise = noise + self.settings.noise_offset * offset
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch,), generator=self.generator, device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        predicted = self.unet(noisy.to(self.frozen_dtype), timesteps, embeddings).sample
        velocity = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
        per_sample = F.mse_loss(predicted.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.settings.snr_gamma:
            per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.settings.snr_gamma)
        return per_sample

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

    def samples(self, prompts: list[str]) -> list[Image.Image]:
        """Pictures of ``prompts`` drawn with the adapter as trained so far (the base's own scheduler, fixed seeds)."""
        return self._draw(prompts, seeds=range(self.settings.seed, self.settings.seed + len(prompts)))

    @torch.no_grad()
    def _draw(self, prompts: list[str], seeds: Iterable[int]) -> list[Image.Image]:
        """``prompts`` drawn by the UNet as it is now, the i-th with the i-th seed, DRAW_BATCH at a time."""
        self.unet.eval()
        with self.loading:
            pipeline = StableDiffusionPipeline.from_pretrained(
                self.location,
                unet=self.unet.to(self.device),
                vae=self.vae.to(self.device),
                text_encoder=self.text_encoder.to(self.device),
                tokenizer=self.tokenizer,
                safety_checker=None,
                requires_safety_checker=False,
                dtype=self.frozen_dtype,
            )
        pipeline.set_progress_bar_config(disable=True)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        size, pictures = self.settings.resolution, []
        try:
            for start in range(0, len(prompts), DRAW_BATCH):
                batch = slice(start, start + DRAW_BATCH)
                drawn = pipeline(prompts[batch], num_inference_steps=SAMPLE_STEPS, width=size, height=size, generator=generators[batch])
                pictures += drawn.images
            return pictures
        finally:
            self.vae.to("cpu")
            self.text_encoder.to("cpu")


def start_training(
    models_dir: Path,
    base: str,
    photos: list[Path],
    settings: TrainingSettings,
    device: str,
    loading: AbstractContextManager = nullcontext(),
    class_images_dir: Path | None = None,
) -> LoraTrainer:
    """A training of a LoRA on ``base`` (a hub id, or a folder under ``models_dir``) from the prepared ``photos``, its
    class pictures cached in ``class_images_dir`` (default: CLASS_IMAGES_FOLDER under ``models_dir``, beside the
    bases they come from); ModelLoadError when the base cannot be read."""
    class_images_dir = class_images_dir or models_dir / CLASS_IMAGES_FOLDER
    location = checkpoint_location(models_dir, base)
    try:
        return LoraTrainer(location, photos, settings, device, loading=loading, class_images_dir=class_images_dir)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load base '{base}' for training", detail=first_line(error)) from error
