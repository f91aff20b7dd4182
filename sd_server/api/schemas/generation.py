"""The generation requests and answers: POST /generate and /generate/image, their images and parameters."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from sd_server.domain.generation import (
    DEFAULT_HIRES_STRENGTH,
    HIRES_UPSCALERS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    Generation,
    Hires,
    Mode,
    SchedulerName,
    hires_size,
)
from sd_server.domain.models import DEFAULT_USER, USER_ID_PATTERN, Text

StyleName = Annotated[Text, Field(min_length=1, max_length=100)]



GENERATE_EXAMPLE: dict[str, JsonValue] = {
    "prompt": "a portrait photo of sks person, studio lighting, 85mm",
    "negative_prompt": "blurry, lowres",
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "width": 512,
    "height": 512,
    "seed": 42,
    "num_images": 1,
    "scheduler": "dpmpp_2m",
}


class HiresRequest(BaseModel):
    """Hires fix, as A1111's enable_hr: the first pass at width x height, upscaled (by ``scale``, or to a size),
    then refined by an img2img pass; the images come out at the upscaled size."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(2.0, ge=1.0, le=4.0, allow_inf_nan=False, description="Upscale factor (unless width or height is set).")
    width: int = Field(0, ge=0, le=MAX_SIDE, description="Upscaled width; 0: by scale, or by the aspect when only height is set.")
    height: int = Field(0, ge=0, le=MAX_SIDE, description="Upscaled height; 0: by scale, or by the aspect when only width is set.")
    upscaler: str = Field(
        "Latent", json_schema_extra={"enum": list(HIRES_UPSCALERS)}, description="Latent ones resize the latents; Lanczos and Nearest the picture."
    )
    steps: int = Field(0, ge=0, le=150, description="Steps of the second pass (as img2img: x denoising_strength run); 0: num_inference_steps.")
    denoising_strength: float = Field(DEFAULT_HIRES_STRENGTH, gt=0, le=1, allow_inf_nan=False, description="How far the second pass may move from the upscaled picture.")

    @field_validator("upscaler")
    @classmethod
    def upscaler_is_known(cls, upscaler: str) -> str:
        """Refuse an upscaler the service does not have."""
        if upscaler not in HIRES_UPSCALERS:
            raise ValueError(f"unknown upscaler; one of {', '.join(HIRES_UPSCALERS)}")
        return upscaler

    def to_hires(self, width: int, height: int) -> Hires:
        """The domain's hires fix after a first pass of width x height; ValueError when its size is out of range."""
        target = hires_size(width, height, self.scale, self.width, self.height)
        return Hires(*target, upscaler=self.upscaler, steps=self.steps, strength=self.denoising_strength)


class GenerateRequest(BaseModel):
    """What to generate, and for whom."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [GENERATE_EXAMPLE]})

    prompt: Text = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="What the image shows.")
    negative_prompt: Text | None = Field(None, max_length=MAX_PROMPT_CHARS, description="What the image must not show.")
    user_id: str = Field(DEFAULT_USER, pattern=USER_ID_PATTERN, description="Whose model to use.")
    num_inference_steps: int = Field(30, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance (CFG) scale.")
    width: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="Pixels; a multiple of 8 (SD_MAX_PIXEL_STEPS caps the size).")
    height: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="Pixels; a multiple of 8 (SD_MAX_PIXEL_STEPS caps the size).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Left out, a random seed is drawn and returned.")
    num_images: int = Field(1, ge=1, le=4, description="Images to make; image i uses seed + i.")
    scheduler: SchedulerName | None = Field(None, description="Sampler; left out, the model's own.")
    styles: list[StyleName] = Field(
        default_factory=list, max_length=10, description="Style presets (GET /styles) applied to the prompts in order."
    )
    init_image: str | None = Field(
        None,
        description="img2img: the picture to start from, base64 (PNG, JPEG, WebP...) or a data: URL. It is stretched to "
        "width x height; leave both out to keep its size and aspect (at most 512 on the longer side, at least 256 on the shorter).",
    )
    strength: float = Field(
        0.75,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="img2img and inpainting: how far to move from init_image (near 0 keeps it, 1 ignores it). "
        "int(num_inference_steps x strength) steps run.",
    )
    mask_image: str | None = Field(
        None,
        description="Inpainting (needs init_image): white repaints, black keeps. Base64 or a data: URL; stretched to "
        "the init image's output size.",
    )
    mask_blur: int = Field(4, ge=0, le=64, description="Inpainting: Gaussian blur radius of the mask's edge, in pixels.")
    inpaint_full_res: bool = Field(
        False,
        description="Inpainting: repaint only the masked area at full resolution: a crop around the mask (plus the "
        "padding) is generated at width x height and pasted back.",
    )
    inpaint_full_res_padding: int = Field(32, ge=0, le=256, description="Inpainting at full resolution: pixels kept around the mask.")
    hires: HiresRequest | None = Field(None, description="Hires fix (text-to-image only): upscale the first pass and refine it.")

    @field_validator("prompt")
    @classmethod
    def prompt_is_not_blank(cls, prompt: str) -> str:
        """Reject a prompt of whitespace only."""
        if not prompt.strip():
            raise ValueError("prompt must contain something other than whitespace")
        return prompt

    def to_generation(self, user_id: str) -> Generation:
        """The domain's text-to-image generation, for ``user_id`` (who the request acts for); styles and images are
        applied to it by the API (sd_server.api.submissions)."""
        return Generation(**self.model_dump(include=TEXT_TO_IMAGE_FIELDS), user_id=user_id)


TEXT_TO_IMAGE_FIELDS = {
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "seed", "num_images", "scheduler",
}  # fmt: skip


class GenerationParameters(BaseModel):
    """The effective request: every default filled in, the seed drawn, the scheduler resolved."""

    prompt: str
    negative_prompt: str | None
    user_id: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    scheduler: str = Field(..., description="The scheduler that ran: a SchedulerName, or the model's own class name.")
    mode: Mode = Field(..., description="txt2img, img2img (init_image) or inpaint (init_image and mask_image).")
    styles: list[str] = Field(..., description="Style presets applied; the prompts above are the effective ones.")
    strength: float | None = Field(..., description="img2img and inpainting: the denoising strength (null for txt2img).")
    mask_blur: int | None = Field(None, description="Inpainting: the mask's blur.")
    inpaint_full_res: bool | None = Field(None, description="Inpainting: only the masked area, at full resolution.")
    inpaint_full_res_padding: int | None = None
    hires: dict[str, Any] | None = Field(None, description="Hires fix: its size, upscaler, steps and strength (null: none).")


class GeneratedImage(BaseModel):
    """One image of a generation."""

    image_base64: str = Field(..., description="The PNG, base64-encoded.")
    seed: int = Field(..., description="Send this seed with num_images=1 to get this image alone.")
    image_path: str | None = Field(None, description="Where the PNG was saved on the server (null if saving is off).")
    watermark_fingerprint: str | None = Field(
        None, description="The fingerprint this image's watermark carries (what POST /provenance/verify reads back)."
    )


class GenerateResponse(BaseModel):
    """The result of ``POST /generate``."""

    image_base64: str = Field(..., description="The first image, as a base64 PNG.")
    images: list[GeneratedImage]
    seed: int = Field(..., description="Seed of the first image.")
    model_id: str
    user_id: str
    generation_time: float = Field(..., description="Seconds spent generating, model load included.")
    image_path: str | None = Field(None, description="Where the first PNG was saved on the server.")
    parameters: GenerationParameters
