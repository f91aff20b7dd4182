"""The demo model's parts: Stable Diffusion 1.5's classes and layout (VAE scale factor 8, 4 latent channels, a
UNet with cross-attention at every level, a CLIP text encoder and tokenizer, SD1.5's scheduler), sized for a CPU."""

from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_server.demo.vocabulary import TEXT_POSITIONS, build_tokenizer

TEXT_WIDTH = 64

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
# The demo model predicts velocity (as Stable Diffusion 2 does): at high noise its target is the picture itself,
# which teaches a model trained from scratch in minutes to follow the prompt far sooner than noise prediction.
DEMO_SCHEDULER_CONFIG = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}


def build_text_encoder(tokenizer: CLIPTokenizer, width: int = TEXT_WIDTH) -> CLIPTextModel:
    """A two-layer CLIP text transformer of ``width`` over the tokenizer's vocabulary, its word embeddings drawn at
    unit scale: each word then stands out in the encoder's output from the start (CLIP's own 0.02 suits an encoder
    that arrives pretrained, not one learnt from scratch in minutes)."""
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_POSITIONS,
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder.get_input_embeddings().weight.data.normal_(0.0, 1.0)
    return text_encoder


def build_vae(scaling_factor: float = 1.0, channels: tuple[int, ...] = (16, 32, 64, 64)) -> AutoencoderKL:
    """SD1.5's autoencoder layout (four levels, so a factor of 8; 4 latent channels), with few channels and no
    attention."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,  # fully convolutional: what it learns on crops holds for whole pictures
    )


def build_unet() -> UNet2DConditionModel:
    """A three-level UNet with the prompt at every level: cross-attention in each block (at the 32x32 level only
    cross-attention, which keeps it fast), and the attention-pooled prompt added to the time embedding."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        only_cross_attention=(True, False, False),
        mid_block_only_cross_attention=False,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_pipeline(vae: AutoencoderKL | None = None) -> StableDiffusionPipeline:
    """An untrained demo pipeline (the trainer's starting point)."""
    tokenizer = build_tokenizer()
    return StableDiffusionPipeline(
        vae=vae or build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=PNDMScheduler.from_config(DEMO_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
