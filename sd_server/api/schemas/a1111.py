"""AUTOMATIC1111's API (/sdapi/v1), in its own shapes."""


from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# --- AUTOMATIC1111's API (/sdapi/v1), in its own shapes -----------------------------------------------------------
from sd_server.api.schemas.generation import StyleName
from sd_server.domain.generation import MAX_PROMPT_CHARS, MAX_SEED
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
    cfg_scale: float = Field(7.0, ge=1.0, le=20.0, allow_inf_nan=False)
    width: int = Field(512, ge=256, le=1024, multiple_of=8)
    height: int = Field(512, ge=256, le=1024, multiple_of=8)
    sampler_name: str | None = Field(None, description="An A1111 sampler name (GET /sdapi/v1/samplers); null: the model's own.")
    sampler_index: str | None = Field(None, description="Deprecated by A1111: sampler_name wins.")
    scheduler: str | None = Field(None, description="A1111's schedule type: Karras turns DPM++ 2M into DPM++ 2M Karras.")
    enable_hr: bool = Field(False, description="Hires fix is not supported: true is refused.")


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
