"""Request and response models of the HTTP API."""

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**32 - 1


class SchedulerName(str, Enum):
    """The samplers a request may pick; left out, the model's own scheduler runs."""

    pndm = "pndm"
    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    heun = "heun"
    dpmpp_2m = "dpmpp_2m"
    dpmpp_2m_karras = "dpmpp_2m_karras"
    unipc = "unipc"


class GenerateRequest(BaseModel):
    """What to generate, and for whom."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a portrait photo of sks person, studio lighting, 85mm",
                    "negative_prompt": "blurry, lowres",
                    "user_id": "default",
                    "num_inference_steps": 30,
                    "guidance_scale": 7.5,
                    "width": 512,
                    "height": 512,
                    "seed": 42,
                    "num_images": 1,
                    "scheduler": "dpmpp_2m",
                }
            ]
        },
    )

    prompt: str = Field(..., min_length=1, max_length=2000, description="What the image shows.")
    negative_prompt: str | None = Field(None, max_length=2000, description="What the image must not show.")
    user_id: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Whose model to use.")
    num_inference_steps: int = Field(30, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=20.0, description="Classifier-free guidance (CFG) scale.")
    width: int = Field(512, ge=256, le=1024, multiple_of=8, description="Pixels; a multiple of 8.")
    height: int = Field(512, ge=256, le=1024, multiple_of=8, description="Pixels; a multiple of 8.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Left out, a random seed is drawn and returned.")
    num_images: int = Field(1, ge=1, le=4, description="Images to make; image i uses seed + i.")
    scheduler: SchedulerName | None = Field(None, description="Sampler; left out, the model's own.")

    @field_validator("prompt")
    @classmethod
    def prompt_is_not_blank(cls, prompt: str) -> str:
        """Reject a prompt of whitespace only."""
        if not prompt.strip():
            raise ValueError("prompt must contain something other than whitespace")
        return prompt


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


class GeneratedImage(BaseModel):
    """One image of a generation."""

    image_base64: str = Field(..., description="The PNG, base64-encoded.")
    seed: int = Field(..., description="Send this seed with num_images=1 to get this image alone.")
    image_path: str | None = Field(None, description="Where the PNG was saved on the server (null if saving is off).")


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


class HealthResponse(BaseModel):
    """Liveness and what the service runs on."""

    status: str = Field(..., examples=["ok"])
    device: str = Field(..., examples=["cuda"])
    dtype: str = Field(..., examples=["float16"])
    loaded_models: list[str]
    version: str


class CacheClearResponse(BaseModel):
    """The models that ``DELETE /cache`` unloaded."""

    unloaded: list[str]


class ModelsResponse(BaseModel):
    """Which model serves which user, and which are in memory now."""

    default_model: str
    user_models: dict[str, str] = Field(..., description="user_id -> model id")
    loaded_models: list[str]
    max_loaded_models: int


class RootResponse(BaseModel):
    """Service name, version and where to go next."""

    name: str
    version: str
    docs: str
    endpoints: dict[str, str]


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer but 422."""

    detail: str
