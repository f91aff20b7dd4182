"""Random tiny pipelines and LoRAs with Stable Diffusion 1.5's structure: the whole serving path runs on them in
milliseconds, for tests and benchmarks where the pixels do not matter."""

from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from sd_server.demo.architecture import SD15_SCHEDULER_CONFIG, build_text_encoder, build_vae
from sd_server.demo.vocabulary import build_tokenizer


def build_random_pipeline(seed: int = 0, unet_seed: int | None = None, unet_in_channels: int = 4) -> StableDiffusionPipeline:
    """A tiny SD1.5-shaped pipeline, with weights drawn from ``seed`` (same seed, same weights). A ``unet_seed``
    gives it another UNet and the same VAE and text encoder, like a DreamBooth fine-tune of the ``seed`` model;
    ``unet_in_channels=9`` makes it an inpainting checkpoint (latents, mask, masked-image latents)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(tokenizer, width=32)
    vae = build_vae(scaling_factor=0.18215, channels=(16, 16, 32, 32))
    if unet_seed is not None:
        torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_random_pipeline(output_dir: Path, seed: int = 0, unet_seed: int | None = None, unet_in_channels: int = 4) -> Path:
    """Build a random tiny pipeline and ``save_pretrained`` it to ``output_dir``; returns the folder."""
    build_random_pipeline(seed, unet_seed, unet_in_channels).save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def save_random_lora(
    output_file: Path,
    seed: int,
    rank: int = 4,
    unet: UNet2DConditionModel | None = None,
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS,
    spread: float = 0.5,
    text_encoder: bool = False,
) -> Path:
    """A LoRA for the ``targets`` of ``unet`` (default: the attention projections of the random tiny UNet), and with
    ``text_encoder`` for the tiny text encoder's attention too, made with peft, weights drawn from ``seed`` with
    standard deviation ``spread``; saved as a diffusers .safetensors file. Different seeds give different images."""
    unet = unet or build_random_pipeline().unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    layers = {"unet_lora_layers": randomised_lora(unet, generator, spread)}
    if text_encoder:
        encoder = build_random_pipeline().text_encoder
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), encoder)
        layers["text_encoder_lora_layers"] = randomised_lora(encoder, generator, spread)
    output_file = Path(output_file)
    StableDiffusionPipeline.save_lora_weights(output_file.parent, weight_name=output_file.name, **layers)
    unet.delete_adapters("default")  # the UNet is as it was: the next LoRA can be made on it
    return output_file


def randomised_lora(model: torch.nn.Module, generator: torch.Generator, spread: float) -> dict[str, torch.Tensor]:
    """Draw the LoRA weights peft put into ``model``; its adapter's state dict."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * spread)
    return get_peft_model_state_dict(model)
