"""Request and response models of the HTTP API (the OpenAPI schema at /docs); domain types live in sd_server.domain."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from sd_server.domain.generation import MAX_PROMPT_CHARS, MAX_SEED, Generation, Mode, SchedulerName
from sd_server.domain.jobs import JobStatus
from sd_server.domain.models import DEFAULT_USER, USER_ID_PATTERN, Text, UserModel
from sd_server.domain.trainings import DEFAULT_CAPTION, MAX_CAPTION_CHARS, TrainingStatus, check_caption_template

StyleName = Annotated[Text, Field(min_length=1, max_length=100)]

GENERATE_EXAMPLE = {
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


class GenerateRequest(BaseModel):
    """What to generate, and for whom."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [GENERATE_EXAMPLE]})

    prompt: Text = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="What the image shows.")
    negative_prompt: Text | None = Field(None, max_length=MAX_PROMPT_CHARS, description="What the image must not show.")
    user_id: str = Field(DEFAULT_USER, pattern=USER_ID_PATTERN, description="Whose model to use.")
    num_inference_steps: int = Field(30, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=20.0, allow_inf_nan=False, description="Classifier-free guidance (CFG) scale.")
    width: int = Field(512, ge=256, le=1024, multiple_of=8, description="Pixels; a multiple of 8.")
    height: int = Field(512, ge=256, le=1024, multiple_of=8, description="Pixels; a multiple of 8.")
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


USER_MODEL_EXAMPLES = [
    {"kind": "checkpoint", "source": "Zhurah/sd15-dreambooth-photoai"},
    {"kind": "lora", "base": "demo", "source": "loras/alice.safetensors", "scale": 0.8},
]


class UserModelResponse(BaseModel):
    """A user's model, and where it comes from."""

    user_id: str
    model: UserModel
    origin: Literal["settings", "api"] = Field(
        ..., description="settings: SD_DEFAULT_MODEL / SD_USER_MODELS(_FILE); api: set by PUT or POST /users/{user_id}/..."
    )


class TierStats(BaseModel):
    """One tier of the model cache: what it holds and what it has done since start."""

    models: list[str] = Field(..., description="Checkpoints resident in this tier, least recently used first.")
    bytes: int = Field(..., description="Bytes of weights resident (shared components counted once).")
    budget_bytes: int = Field(..., description="SD_CACHE_DEVICE_GB or SD_CACHE_CPU_GB, in bytes.")
    hits: int
    misses: int
    evictions: int
    load_seconds: float = Field(..., description="Seconds spent bringing models into this tier.")


class AdapterStats(BaseModel):
    """LoRA adapters loaded into resident base pipelines."""

    resident: list[str] = Field(..., description="LoRA sources loaded, least recently used first.")
    bytes: int
    max_adapters: int = Field(..., description="SD_MAX_ADAPTERS, per base checkpoint.")
    hits: int
    misses: int
    evictions: int
    load_seconds: float


class ReplicaPlacement(BaseModel):
    """One Ray Serve replica (SD_ENGINE=ray): its process and what ran on it."""

    pid: int
    alive: bool = Field(..., description="False once its process died under a batch (Serve starts another).")
    running: int = Field(..., description="Batches on it now.")
    batches: int
    jobs: int
    jobs_loading: int = Field(..., description="Jobs whose batch had to load its base on this replica first.")
    jobs_by_model: dict[str, int] = Field(..., description="Base checkpoint -> jobs run on it here.")


class RayPlacement(BaseModel):
    """Where jobs ran under SD_ENGINE=ray, and how often their model was already there."""

    replicas: dict[str, ReplicaPlacement]
    jobs: int
    jobs_without_load: float | None = Field(..., description="Fraction of jobs whose replica already held their base.")
    batches_mixing_bases: int = Field(..., description="Batches a replica received with another base than it was routed by (always 0).")
    reruns: int = Field(..., description="Batches run again because their replica died.")


class CacheStats(BaseModel):
    """The model cache, per tier, plus components shared between checkpoints; the replicas' caches summed under
    SD_ENGINE=ray, with where jobs ran."""

    device: TierStats
    cpu: TierStats
    adapters: AdapterStats
    shared_components: int = Field(..., description="Components (VAE, text encoder, ...) that several checkpoints use.")
    ray: RayPlacement | None = Field(None, description="SD_ENGINE=ray only.")


class QueueStats(BaseModel):
    """The job queue now, and the batches it has run."""

    queued: int
    running: int
    max_queue: int
    max_batch_size: int
    batches_run: int
    mixed_batches_run: int = Field(..., description="Batches whose jobs ran on more than one model (different LoRAs on one base).")
    mean_batch_size: float = Field(..., description="Images per pipeline call, over every batch run so far.")


class PartStatus(BaseModel):
    """One part of the service (a worker thread, a background task, the database)."""

    state: Literal["ok", "busy", "failing", "dead"]
    detail: str | None = Field(None, description="Why it is failing or dead.")
    since: float = Field(..., description="Unix time of the last change of state.")


class HealthResponse(BaseModel):
    """Liveness: ok, degraded (a part is failing and goes on) or not ok (a part is dead: 503), and the version.
    With an admin key (or when no key is required) also what the service runs on and each part's state."""

    status: Literal["ok", "degraded", "not ok"] = Field(..., examples=["ok"])
    version: str
    device: str | None = Field(None, examples=["cuda"])
    dtype: str | None = Field(None, examples=["float16"])
    loaded_models: list[str] | None = Field(None, description="Checkpoints in memory (either tier), least recently used first.")
    queue: QueueStats | None = None
    cache: CacheStats | None = None
    parts: dict[str, PartStatus] | None = Field(None, description="device, loader, encoder, webhooks, retention, database.")


class CacheClearResponse(BaseModel):
    """The models that ``DELETE /cache`` unloaded."""

    unloaded: list[str]


class ModelsResponse(BaseModel):
    """Which model serves which user, and which are in memory now."""

    default_model: str = Field(..., description="The model id of the `default` user.")
    user_models: dict[str, UserModel] = Field(..., description="user_id -> model")
    loaded_models: list[str]
    cache: CacheStats


class RootResponse(BaseModel):
    """Service name, version and where to go next."""

    name: str
    version: str
    docs: str
    endpoints: dict[str, str]


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer but 422."""

    detail: str


class JobRequest(GenerateRequest):
    """A generation to run in the background; the same fields as POST /generate, plus a webhook."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**GENERATE_EXAMPLE, "webhook_url": "https://example.com/hooks/sd-jobs"}]}
    )

    webhook_url: HttpUrl | None = Field(None, description="POSTed the job JSON once the job ends.")


class JobLinks(BaseModel):
    """Where to follow a job."""

    self: str
    events: str
    cancel: str


class JobCreated(BaseModel):
    """The answer to POST /jobs."""

    job_id: str
    status: JobStatus
    position: int | None = Field(..., description="1 = next to run; null once it runs.")
    links: JobLinks


class JobProgress(BaseModel):
    """Denoising steps done, of how many."""

    step: int
    total: int


class JobImage(BaseModel):
    """One image of a finished job."""

    url: str | None = Field(..., description="GET this for the PNG (null when the image was not stored).")
    seed: int
    image_path: str | None


class JobResult(BaseModel):
    """What POST /generate answers, with URLs instead of base64."""

    image_url: str | None
    images: list[JobImage]
    seed: int
    model_id: str
    user_id: str
    generation_time: float
    image_path: str | None
    parameters: GenerationParameters


class JobResponse(BaseModel):
    """A job's state, progress and, once it ends, its result or error."""

    job_id: str
    status: JobStatus
    user_id: str
    model_id: str
    position: int | None
    progress: JobProgress
    batch_size: int | None = Field(..., description="Images in the pipeline call this job ran in.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JobResult | None
    error: str | None
    links: JobLinks


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[JobResponse]
    total: int = Field(..., description="Jobs that match the filters, on every page.")
    limit: int
    offset: int
    next_cursor: str | None = Field(..., description="Pass as cursor for the next page; null on the last.")


class KeyCreateRequest(BaseModel):
    """A new API key's owner and role."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": "alice", "role": "user"}]})

    user_id: str = Field(..., pattern=USER_ID_PATTERN, description="The user the key acts as.")
    role: Literal["user", "admin"] = Field("user", description="admin: every user, keys, cache and registry.")


class KeyInfo(BaseModel):
    """An API key without the key itself."""

    id: str
    user_id: str
    role: str
    prefix: str = Field(..., description="The key's first characters, to tell keys apart.")
    created_at: datetime


class KeyCreated(BaseModel):
    """A new API key: `key` is shown this once and stored only as a hash."""

    id: str
    key: str
    user_id: str
    role: str


class TrainingForm(BaseModel):
    """The form fields of a training upload, beside the photos (`images`, repeated) or a zip of them (`archive`)."""

    model_config = ConfigDict(extra="forbid")

    trigger: str = Field("sks", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="The rare word that names the subject in prompts.")
    class_word: str = Field("person", pattern=r"^[A-Za-z][A-Za-z -]{0,31}$", description="What the subject is: person, man, woman, dog...")
    caption: Text = Field(
        DEFAULT_CAPTION,
        min_length=1,
        max_length=MAX_CAPTION_CHARS,
        pattern=r"\{trigger\}",
        description="Caption of every photo; {trigger} and {class_word} are filled in (no other braces).",
    )
    steps: int = Field(500, ge=1, description="Training steps (at most SD_MAX_TRAINING_STEPS).")
    rank: int = Field(8, ge=1, le=128, description="LoRA rank.")
    learning_rate: float = Field(1e-4, gt=0, le=1, allow_inf_nan=False)
    resolution: int = Field(512, ge=64, le=1024, multiple_of=8, description="Side of the square the photos are cropped to.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=8)
    snr_gamma: float | None = Field(5.0, gt=0, le=100, allow_inf_nan=False, description="Min-SNR-gamma loss weighting; null: off.")
    noise_offset: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="Offset noise (darker darks, brighter brights).")
    activate: bool = Field(True, description="Make the trained LoRA the user's model when it succeeds.")
    webhook_url: HttpUrl | None = Field(None, description="POSTed the training's JSON when it ends.")

    @field_validator("caption")
    @classmethod
    def only_known_fields(cls, caption: str) -> str:
        """The caption may name {trigger} and {class_word}, nothing else."""
        return check_caption_template(caption)


class TrainingLinks(BaseModel):
    """Where to follow a training."""

    self: str
    events: str
    cancel: str


class TrainingCreated(BaseModel):
    """The answer to POST /users/{user_id}/trainings."""

    training_id: str
    status: TrainingStatus
    photos: int = Field(..., description="Distinct photos kept (exact duplicates dropped).")
    links: TrainingLinks


class TrainingProgress(BaseModel):
    """How far a training got."""

    step: int
    total: int
    loss: float | None = Field(..., description="Mean loss of the last slice of steps.")
    eta_s: float | None = Field(..., description="Seconds left at the recent pace.")


class TrainingParameters(BaseModel):
    """The settings a training runs with."""

    trigger: str
    class_word: str
    caption: str
    steps: int
    rank: int
    learning_rate: float
    resolution: int
    seed: int
    batch_size: int
    snr_gamma: float | None
    noise_offset: float
    activate: bool


class TrainingResponse(BaseModel):
    """A training: where it is, what it runs with, and the model it produced."""

    training_id: str
    status: TrainingStatus
    user_id: str
    base: str = Field(..., description="The checkpoint the LoRA is trained on.")
    photos: int
    progress: TrainingProgress
    settings: TrainingParameters
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    samples: list[str] = Field(..., description="URLs of sample images drawn with the trained LoRA.")
    model: UserModel | None = Field(..., description="The LoRA it produced (the user's model when activate).")
    error: str | None
    links: TrainingLinks


class TrainingList(BaseModel):
    """A page of trainings, newest first."""

    trainings: list[TrainingResponse]
    total: int
    limit: int
    offset: int


class StyleRequest(BaseModel):
    """A style preset's text; ``{prompt}`` stands for the request's prompt (else the text is appended)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "{prompt}, studio lighting, 85mm, sharp focus", "negative_prompt": "blurry, lowres"}]},
    )

    prompt: Text = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: Text = Field("", max_length=MAX_PROMPT_CHARS)


class StyleResponse(BaseModel):
    """A style preset, and where it is defined."""

    name: str
    prompt: str
    negative_prompt: str
    origin: Literal["file", "api"] = Field(..., description="file: SD_STYLES_FILE; api: PUT /styles/{name} (wins over the file).")


# --- AUTOMATIC1111's API (/sdapi/v1), in its own shapes -----------------------------------------------------------


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
    parameters: dict
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
    options: dict = Field(default_factory=dict)


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


class SessionRequest(BaseModel):
    """The API key a browser signs in with."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"api_key": "sdk_..."}]})

    api_key: str = Field(..., min_length=1, max_length=200)


class SessionResponse(BaseModel):
    """Who the browser acts as, and the token its changes must send."""

    user_id: str | None = Field(..., description="null for an admin key's session in open mode (requests act for `default`).")
    role: Literal["user", "admin"]
    open: bool = Field(..., description="True when the service needs no key (SD_AUTH): no cookie is set.")
    csrf_token: str | None = Field(..., description="Send as X-CSRF-Token with every POST, PUT and DELETE the session cookie signs.")
    expires_at: int | None = Field(..., description="Unix time the session ends (SD_SESSION_TTL_S after signing in).")
