"""Build the bundled demo model: a tiny Stable Diffusion 1.5-shaped pipeline with random weights.

It has SD1.5's structure (VAE scale factor 8, 4 latent channels, a CLIP text encoder and tokenizer
with 77 positions, the SD1.5 PNDM scheduler) and real diffusers classes, but it is tiny and untrained:
it draws noise. It exists so the whole serving path runs, and is tested, on any machine without a
download. Usage: ``python demo_model.py [OUTPUT_DIR]`` (default ``models/demo``).
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "models" / "demo"
TEXT_POSITIONS = 77

# The scheduler of runwayml/stable-diffusion-v1-5 and its DreamBooth descendants.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer whose vocab (every byte, as word piece and word end) is built here."""
    symbols = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [symbol + "</w>" for symbol in symbols]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_POSITIONS)


def build_demo_pipeline(seed: int = 0, unet_seed: int | None = None) -> StableDiffusionPipeline:
    """The tiny SD1.5-shaped pipeline, with weights drawn from ``seed`` (same seed, same weights). A ``unet_seed``
    gives it another UNet and the same VAE and text encoder, like a DreamBooth fine-tune of the ``seed`` model."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_POSITIONS,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = build_demo_vae()
    if unet_seed is not None:
        torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
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


def build_demo_vae() -> AutoencoderKL:
    """The demo model's VAE: SD1.5's layout (scale factor 8, 4 latent channels), tiny."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )


def save_demo_model(output_dir: Path = DEMO_MODEL_DIR, seed: int = 0, unet_seed: int | None = None) -> Path:
    """Build the demo pipeline and ``save_pretrained`` it to ``output_dir``; returns the folder."""
    output_dir = Path(output_dir)
    build_demo_pipeline(seed, unet_seed).save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def save_demo_lora(output_file: Path, seed: int, rank: int = 4, unet: UNet2DConditionModel | None = None) -> Path:
    """A LoRA for the attention projections of ``unet`` (default: the demo UNet), made with peft, weights drawn from
    ``seed``; saved as a diffusers .safetensors file. Different seeds give different images."""
    unet = unet or build_demo_pipeline().unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    output_file = Path(output_file)
    StableDiffusionPipeline.save_lora_weights(
        output_file.parent, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=output_file.name
    )
    unet.delete_adapters("default")  # the UNet is as it was: the next LoRA can be made on it
    return output_file


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_MODEL_DIR
    print(f"demo model written to {save_demo_model(target)}")
