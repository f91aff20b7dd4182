"""The service's own answers: health and its parts, the cache, the models list, the root, errors."""

from typing import Literal

from pydantic import BaseModel, Field

from sd_server.api.schemas.provenance import ProvenanceSettings
from sd_server.domain.models import UserModel


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
    scheduling: Literal["fair", "fifo"] = Field(..., description="SD_SCHEDULING: how the next batch's lead is chosen.")
    queued_by_user: dict[str, int] = Field(..., description="Jobs queued per user (users with none left out).")
    tenant_shares: dict[str, float] = Field(
        ..., description="Each tenant's (API key owner's) share of the pixel-steps served since the start."
    )


class PartStatus(BaseModel):
    """One part of the service (a worker thread, a background task, the database)."""

    state: Literal["ok", "busy", "failing", "dead"]
    detail: str | None = Field(None, description="Why it is failing or dead.")
    since: float = Field(..., description="Unix time of the last change of state.")


class CompileStats(BaseModel):
    """SD_COMPILE: whether the UNet (and VAE decode) runs compiled, how, and the compiles since start."""

    enabled: bool
    mode: str | None = Field(None, examples=["default"])
    batch_sizes: list[int] | None = Field(None, description="Images per compiled call; a batch is padded up to the next.")
    lora_rank: int | None = Field(None, description="Rank of the compiled UNet's LoRA slots (SD_COMPILE_LORA_RANK); 0: none.")
    vae: bool | None = Field(None, description="Whether the VAE's decode is compiled too (SD_COMPILE_VAE).")
    cache_dir: str | None = Field(None, description="Where compiled kernels are kept between starts.")
    compiles: int = Field(0, description="Graphs compiled since start, warm-ups included.")
    compile_seconds: float = Field(0.0, description="Seconds spent compiling since start, warm-ups included.")
    compiles_on_requests: int = Field(
        0, description="Compiles a request waited for: an image size not in SD_COMPILE_SIZES, a long prompt, or a recompile."
    )
    lora_batches_uncompiled: int = Field(
        0, description="LoRA batches that ran uncompiled: a LoRA past the slots' rank, with a bias or DoRA, or on layers without slots."
    )


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
    device_memory_peak_bytes: int | None = Field(None, description="The most device memory tensors held since start (0 off CUDA).")
    compile: CompileStats | None = None
    parts: dict[str, PartStatus] | None = Field(None, description="device, loader, encoder, webhooks, retention, database.")
    provenance: ProvenanceSettings | None = Field(None, description="The marks every generated image carries (docs/provenance.md).")


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
