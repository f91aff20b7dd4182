"""AUTOMATIC1111's API (/sdapi/v1), in its own shapes."""


from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# --- AUTOMATIC1111's API (/sdapi/v1), in its own shapes -----------------------------------------------------------
from sd_server.api.schemas.generation import StyleName
from sd_server.domain.generation import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MIN_SIDE
from sd_server.domain.models import Text


class A1111Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111's txt2img body. Fields that do not apply here (hires fix aside, which is refused) are accepted
    and ignored, so that existing clients work unchanged."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"prompt": "a portrait photo of sks person", "steps": 20, "sampler_name": "Euler a", "seed": -1}]},
    )

    prompt: Text = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: Text | None = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[StyleName] | None = Field(None, max_length=10)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed.")
    batch_size: int = Field(1, ge=1, le=4)
    n_iter: int = Field(1, ge=1, le=4, description="batch_size x n_iter images, at most 4.")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=1.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    width: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    height: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    sampler_name: str | None = Field(None, description="An A1111 sampler name (GET /sdapi/v1/samplers); null: the model's own.")
    sampler_index: str | None = Field(None, description="Deprecated by A1111: sampler_name wins.")
    scheduler: str | None = Field(
        None, max_length=64, description="A1111's schedule type (GET /sdapi/v1/schedulers): Karras runs the sampler's Karras variant."
    )
    enable_hr: bool = Field(False, description="Hires fix: upscale the first pass (hr_scale, or hr_resize_x/y) and refine it with img2img.")
    hr_scale: float = Field(2.0, ge=1.0, le=4.0, allow_inf_nan=False)
    hr_upscaler: str | None = Field(None, description="Latent (and its variants), Lanczos or Nearest; null: Latent.")
    hr_second_pass_steps: int = Field(0, ge=0, le=150, description="0: the first pass's steps.")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE)
    denoising_strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Hires fix's second pass; null: 0.7.")


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    """AUTOMATIC1111's img2img body: init images (the first is used), and a mask for inpainting."""

    model_config = ConfigDict(extra="ignore")

    init_images: list[str] = Field(..., min_length=1, description="Base64 images (the first is used).")
    mask: str | None = Field(None, description="Base64 mask: white repaints (black with inpainting_mask_invert).")
    denoising_strength: float = Field(0.75, gt=0, le=1, allow_inf_nan=False)
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpaint_full_res: bool = Field(True, description="Inpaint area: true = only masked (A1111's default), false = whole picture.")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    include_init_images: bool = Field(False, description="Add the init image after the generated ones.")


class A1111ImagesResponse(BaseModel):
    """What A1111 answers a generation: base64 PNGs, the request as received, and `info`, a JSON string with
    seed, all_seeds, infotexts..."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class A1111ProgressState(BaseModel):
    """Where the caller's current job is."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = Field(False, description="Interrupted: it stops at its next step and answers what it made.")
    job: str = ""
    job_count: int
    job_timestamp: str = ""
    job_no: int = 0
    sampling_step: int
    sampling_steps: int


class A1111Progress(BaseModel):
    """GET /sdapi/v1/progress: the caller's running (else next queued) job, 0..1."""

    progress: float
    eta_relative: float
    state: A1111ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class A1111Sampler(BaseModel):
    """A sampler by A1111's name, with this API's name as an alias."""

    name: str
    aliases: list[str]
    options: dict[str, Any] = Field(default_factory=dict)


class A1111Model(BaseModel):
    """A checkpoint as A1111 lists it."""

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class A1111Style(BaseModel):
    """A style preset as A1111 lists it."""

    name: str
    prompt: str
    negative_prompt: str


class A1111Scheduler(BaseModel):
    """A schedule type as A1111 (1.9+) lists it."""

    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class A1111Upscaler(BaseModel):
    """An upscaler as A1111 lists it: here plain resampling, no model."""

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4


class A1111Lora(BaseModel):
    """A LoRA as A1111 lists it."""

    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class A1111ExtraSingleImageRequest(BaseModel):
    """A1111's extras on one image: resized by a factor (resize_mode 0) or to a size (1) with an upscaler."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(..., min_length=1, description="The picture, base64 (or a data: URL).")
    resize_mode: int = Field(0, ge=0, le=1, description="0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h.")
    upscaling_resize: float = Field(2, gt=0, le=8, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_SIDE)
    upscaler_1: str = Field("None", description="GET /sdapi/v1/upscalers: Lanczos, Nearest or None.")


class A1111ExtraSingleImageResponse(BaseModel):
    """The resized picture."""

    html_info: str
    image: str


class A1111PngInfoRequest(BaseModel):
    """A picture whose generation parameters to read."""

    image: str = Field(..., min_length=1, description="The picture, base64 (or a data: URL).")


class A1111PngInfoResponse(BaseModel):
    """The parameters text a picture carries, its text chunks, and the parameters parsed as A1111 parses them."""

    info: str
    items: dict[str, str]
    parameters: dict[str, str]
