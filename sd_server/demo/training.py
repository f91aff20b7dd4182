"""Trains the demo model from scratch on drawn scenes: first the autoencoder, then the UNet and text encoder in its
latent space (Stable Diffusion's recipe at toy size). Seeded and resumable: a run stopped and resumed ends with the
same weights as one that ran through."""

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from tqdm import tqdm

from sd_server.demo.architecture import DEMO_SCHEDULER_CONFIG, build_pipeline, build_vae
from sd_server.demo.world import (
    BACKGROUNDS,
    Scene,
    draw,
    every_scene,
    prompt,
    prompted_scene,
    random_scene,
    read,
)
from sd_server.engine.lora_training import min_snr_weights


@dataclass(frozen=True)
class TrainingPlan:
    """How long and how hard each part trains; the defaults made the committed weights (the denoiser with
    ``device="cuda"``)."""

    seed: int = 0
    vae_steps: int = 2500
    decoder_steps: int = 1000  # then the decoder alone, on the encoder's means
    vae_batch: int = 8
    vae_crop: int = 128
    foreground_weight: float = 8.0
    scenes: int = 10000
    steps: int = 4000
    batch: int = 64
    learning_rate: float = 8e-4
    warmup: int = 200
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    unconditional: float = 0.1  # share of prompts left empty, for classifier-free guidance
    dropped_word: float = 0.1  # chance that a prompt leaves out its colour, its shape or its background
    save_every: int = 250
    device: str = "cpu"  # "cuda" trains on a GPU (the weights differ in the last bits from a CPU run)


def to_tensor(images: list) -> torch.Tensor:
    """PIL images as a batch in [-1, 1], channels first."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def warmed_up(step: int, warmup: int, peak: float) -> float:
    """The learning rate: a linear warm-up, then constant (the moving average does the annealing)."""
    return peak * min(1.0, (step + 1) / warmup)


def random_crop(image, size: int, rng: random.Random):
    """A ``size`` crop of ``image`` at a random place (on a grid of 8 pixels, the autoencoder's factor)."""
    left, top = rng.randrange(0, image.width - size + 1, 8), rng.randrange(0, image.height - size + 1, 8)
    return image.crop((left, top, left + size, top + size))


def foreground_weights(pixels: torch.Tensor, backgrounds: list[str], weight: float) -> torch.Tensor:
    """Per-pixel loss weights: ``weight`` where a pixel is not its background's colour, 1 elsewhere."""
    colours = torch.tensor([BACKGROUNDS[name] for name in backgrounds], dtype=torch.float32, device=pixels.device) / 127.5 - 1.0
    distance = (pixels - colours[:, :, None, None]).abs().sum(dim=1, keepdim=True)
    return 1.0 + (weight - 1.0) * (distance > 0.3).float()


def crop_batch(plan: TrainingPlan, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of drawn scenes (shapes anywhere, held-out pairs included) and their pixels' loss weights."""
    scenes = [random_scene(rng, include_held_out=True) for _ in range(plan.vae_batch)]
    pixels = to_tensor([random_crop(draw(scene, rng), plan.vae_crop, rng) for scene in scenes]).to(plan.device)
    return pixels, foreground_weights(pixels, [scene.background for scene in scenes], plan.foreground_weight)


def reconstruction_steps(parameters: list, steps: int, peak: float, description: str, loss_of_batch) -> None:
    """Minimise ``loss_of_batch()`` over ``parameters`` for ``steps`` steps, the learning rate cosine-annealed
    from ``peak`` to a tenth of it."""
    optimizer = torch.optim.AdamW(parameters, lr=peak, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=peak / 10)
    bar = tqdm(range(steps), desc=description, unit="step")
    for _ in bar:
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def train_vae(plan: TrainingPlan, rng: random.Random) -> AutoencoderKL:
    """An autoencoder for the world's pictures: L1 reconstruction of random crops, the shapes' pixels weighted up
    (they are few, and their colours must survive), a whisper of KL."""
    vae = build_vae().to(plan.device)

    def loss() -> torch.Tensor:
        pixels, weights = crop_batch(plan, rng)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return (weights * (reconstruction - pixels).abs()).mean() + 1e-6 * posterior.kl().mean()

    reconstruction_steps(list(vae.parameters()), plan.vae_steps, 1e-3, "autoencoder", loss)
    return vae.eval().requires_grad_(False)


def sharpen_decoder(vae: AutoencoderKL, plan: TrainingPlan) -> AutoencoderKL:
    """Fine-tune the decoder alone to draw the encoder's means (as Stability's ft-MSE VAE did): trained on noisy
    samples, it draws soft edges and halos; the denoiser learns the means, so the decoder must draw those sharp."""
    torch.manual_seed(plan.seed + 5)
    rng = random.Random(plan.seed + 5)
    vae.requires_grad_(False).decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)

    def loss() -> torch.Tensor:
        pixels, weights = crop_batch(plan, rng)
        with torch.no_grad():
            means = vae.encode(pixels).latent_dist.mean
        return (weights * (vae.decode(means).sample - pixels).abs()).mean()

    trainable = [parameter for parameter in vae.parameters() if parameter.requires_grad]
    reconstruction_steps(trainable, plan.decoder_steps, 3e-4, "decoder", loss)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, rng: random.Random) -> float:
    """Share of every colour, shape and background, drawn and passed through the autoencoder, that reads back right."""
    scenes = every_scene()
    right = 0
    for scene in scenes:
        decoded = vae.decode(vae.encode(to_tensor([draw(scene, rng)]).to(vae.device)).latent_dist.mean).sample[0]
        image = Image.fromarray(((decoded.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())
        reading = read(image)
        right += (reading.colour, reading.shape, reading.background) == (scene.colour, scene.shape, scene.background)
    return right / len(scenes)


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, scenes: list[Scene], rng: random.Random) -> torch.Tensor:
    """The latent mean of each scene's picture (what the sharpened decoder draws)."""
    means = []
    for start in tqdm(range(0, len(scenes), 32), desc="encoding scenes", unit="batch"):
        pixels = to_tensor([draw(scene, rng) for scene in scenes[start : start + 32]]).to(vae.device)
        means.append(vae.encode(pixels).latent_dist.mean.half().cpu())
    return torch.cat(means)


def training_prompt(scene: Scene, plan: TrainingPlan, rng: random.Random) -> str:
    """The scene's prompt, sometimes empty and sometimes without one of its words."""
    if rng.random() < plan.unconditional:
        return ""
    return prompt(scene, *(rng.random() >= plan.dropped_word for _ in range(3)))


def denoising_loss(
    pipeline: StableDiffusionPipeline, noise_scheduler: DDPMScheduler, clean: torch.Tensor, prompts: list[str], snr_gamma: float
) -> torch.Tensor:
    """How well the pipeline's UNet, told the prompts, predicts the noise (or the velocity, as the scheduler says)
    of the clean latents noised at random timesteps (min-SNR weighted)."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(prompts),), device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    predicted = pipeline.unet(noisy, timesteps, pipeline.text_encoder(ids.to(clean.device))[0]).sample
    velocity = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(clean, noise, timesteps) if velocity else noise
    per_sample = F.mse_loss(predicted, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def update_ema(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model."""
    with torch.no_grad():
        torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)


class DenoiserTraining:
    """The UNet and text encoder learning to predict the noise added to scene latents, with moving averages of
    both; its whole state (weights, optimizer, step, random generators) saves and loads."""

    def __init__(self, plan: TrainingPlan, pipeline: StableDiffusionPipeline, scenes: list[Scene], latents: torch.Tensor) -> None:
        self.plan, self.pipeline, self.scenes, self.latents = plan, pipeline.to(plan.device), scenes, latents.to(plan.device)
        self.unet, self.text_encoder = pipeline.unet.train(), pipeline.text_encoder.train()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.parameters = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=plan.learning_rate, weight_decay=1e-2)
        self.noise_scheduler = DDPMScheduler.from_config(DEMO_SCHEDULER_CONFIG)
        self.rng = random.Random(plan.seed + 1)
        self.step = 0

    def run(self, state_file: Path) -> None:
        """Train up to the plan's step count, saving the state every ``save_every`` steps."""
        bar = tqdm(range(self.step, self.plan.steps), desc="denoiser", unit="step", initial=self.step, total=self.plan.steps)
        for _ in bar:
            loss = self.train_step()
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % self.plan.save_every == 0 or self.step == self.plan.steps:
                self.save(state_file)

    def train_step(self) -> float:
        """One optimizer step on a batch of scenes; returns its loss."""
        plan = self.plan
        for group in self.optimizer.param_groups:
            group["lr"] = warmed_up(self.step, plan.warmup, plan.learning_rate)
        picks = [self.rng.randrange(len(self.scenes)) for _ in range(plan.batch)]
        clean = self.latents[picks].float() * self.pipeline.vae.config.scaling_factor
        prompts = [training_prompt(self.scenes[pick], plan, self.rng) for pick in picks]
        loss = denoising_loss(self.pipeline, self.noise_scheduler, clean, prompts, plan.snr_gamma)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        decay = min(plan.ema_decay, (1 + self.step) / (10 + self.step))
        update_ema(self.ema_unet, self.unet, decay)
        update_ema(self.ema_text, self.text_encoder, decay)
        self.step += 1
        return loss.item()

    def save(self, state_file: Path) -> None:
        """Write the whole training state (atomically: a temporary file, then a rename)."""
        state = {
            "step": self.step,
            "modules": [module.state_dict() for module in (self.unet, self.text_encoder, self.ema_unet, self.ema_text)],
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.plan.device == "cuda" else None,
        }
        partial = state_file.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(state_file)

    def load(self, state_file: Path) -> None:
        """Continue from a saved state."""
        state = torch.load(state_file, weights_only=False)
        for module, weights in zip((self.unet, self.text_encoder, self.ema_unet, self.ema_text), state["modules"]):
            module.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.step = state["step"]

    def averaged_pipeline(self) -> StableDiffusionPipeline:
        """The pipeline with the moving averages as its UNet and text encoder."""
        pipeline = copy.deepcopy(self.pipeline)
        pipeline.register_modules(unet=copy.deepcopy(self.ema_unet).eval(), text_encoder=copy.deepcopy(self.ema_text).eval())
        return pipeline


def prepare_latents(plan: TrainingPlan, work_dir: Path) -> tuple[AutoencoderKL, list[Scene], torch.Tensor]:
    """Phase one, or its saved result: the trained autoencoder (its scaling factor set so latents have unit spread)
    and the latents of the denoiser's scenes. Each part has random generators of its own and saves its result, so
    a run resumed from a saved part makes exactly what a run from scratch would."""
    latents_file = work_dir / "latents.pt"
    if latents_file.exists():
        saved = torch.load(latents_file, weights_only=False)
        return AutoencoderKL.from_pretrained(work_dir / "vae").to(plan.device), saved["scenes"], saved["means"]
    vae = trained_autoencoder(plan, work_dir)
    rng = random.Random(plan.seed + 3)
    scenes = [prompted_scene(rng) for _ in range(plan.scenes)]
    means = encode_scenes(vae, scenes, rng)
    vae.register_to_config(scaling_factor=round(1.0 / float(means.float().std()), 5))
    vae.save_pretrained(work_dir / "vae")
    torch.save({"scenes": scenes, "means": means}, latents_file)
    return vae, scenes, means


def trained_autoencoder(plan: TrainingPlan, work_dir: Path) -> AutoencoderKL:
    """The autoencoder trained whole, then its decoder sharpened: each step's result saved in ``work_dir``."""
    if (work_dir / "vae").exists():
        return AutoencoderKL.from_pretrained(work_dir / "vae").to(plan.device)
    if (work_dir / "autoencoder").exists():
        vae = AutoencoderKL.from_pretrained(work_dir / "autoencoder").to(plan.device)
    else:
        torch.manual_seed(plan.seed)
        vae = train_vae(plan, random.Random(plan.seed))
        vae.save_pretrained(work_dir / "autoencoder")
    vae = sharpen_decoder(vae, plan)
    vae.save_pretrained(work_dir / "vae")
    print(f"autoencoder: {reconstruction_accuracy(vae, random.Random(plan.seed + 4)):.0%} of the world's scenes read back right")
    return vae


def resume(plan: TrainingPlan, work_dir: Path) -> DenoiserTraining:
    """The denoiser's training, at the state last saved in ``work_dir`` (phase one done first if need be)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    vae, scenes, latents = prepare_latents(plan, work_dir)
    torch.manual_seed(plan.seed + 2)
    training = DenoiserTraining(plan, build_pipeline(vae), scenes, latents)
    if (work_dir / "state.pt").exists():
        training.load(work_dir / "state.pt")
    return training


def export(training: DenoiserTraining, output_dir: Path) -> Path:
    """Save the averaged pipeline, float16 safetensors weights, and the plan that made it, to ``output_dir``."""
    training.averaged_pipeline().to("cpu", torch.float16).save_pretrained(output_dir, safe_serialization=True)
    record = {**asdict(training.plan), "trained_steps": training.step}
    (Path(output_dir) / "training_plan.json").write_text(json.dumps(record, indent=2) + "\n")
    return Path(output_dir)


def train(plan: TrainingPlan, output_dir: Path, work_dir: Path) -> Path:
    """Train every part (resuming from ``work_dir`` when it holds a state) and export the result to ``output_dir``."""
    training = resume(plan, work_dir)
    training.run(work_dir / "state.pt")
    return export(training, output_dir)
