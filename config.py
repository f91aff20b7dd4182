"""Service settings: one pydantic-settings class, read from ``SD_*`` environment variables and ``.env``."""

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints
from pydantic_settings import BaseSettings, SettingsConfigDict

from sd_server.domain.models import DEFAULT_USER


class Settings(BaseSettings):
    """Every setting of the service; the environment variable is the field name upper-cased, ``SD_`` first."""

    model_config = SettingsConfigDict(env_prefix="SD_", env_file=".env", extra="ignore")

    default_model: str = Field(
        "Zhurah/sd15-dreambooth-photoai",
        description="Model of the `default` user: a Hugging Face hub id, or a folder (absolute, or under SD_MODELS_DIR).",
    )
    user_models: dict[str, str | dict] = Field(
        default_factory=dict,
        description='User -> model as JSON: a checkpoint id, or an object, e.g. {"alice": "alice-dreambooth", '
        '"bob": {"kind": "lora", "base": "demo", "source": "loras/bob.safetensors", "scale": 0.8}}.',
    )
    user_models_file: Path | None = Field(
        None, description="A JSON file with more of the user -> model mapping (SD_USER_MODELS wins on conflicts)."
    )
    fallback_model: str | None = Field(
        None,
        description="Model for users without one of their own (a hub id or folder, as SD_DEFAULT_MODEL); unset: such users "
        "get 404 saying how to get one. Name a plain base model: the default one may be someone's DreamBooth.",
    )
    models_dir: Path = Field(Path("models"), description="Where local model folders are looked up by name.")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto: CUDA, then MPS, then CPU.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 elsewhere."
    )
    preload_default_model: bool = Field(
        True, description="Load the default model at start-up; /health/ready answers 503 until it has loaded."
    )
    cache_device_gb: float | None = Field(
        None, gt=0, description="Weights kept on the device; unset: 60% of GPU memory on CUDA, 25% of RAM elsewhere."
    )
    cache_cpu_gb: float | None = Field(
        None, ge=0, description="Second tier in host RAM for models moved off the device; unset: 25% of RAM, 0 on a CPU device."
    )
    max_adapters: int = Field(32, ge=1, description="LoRA adapters kept loaded per base checkpoint (LRU).")
    max_upload_bytes: int = Field(512 * 1024**2, ge=1024, description="Largest LoRA upload accepted (413 past it).")
    max_training_upload_bytes: int = Field(
        200 * 1024**2, ge=1024, description="Largest training upload (photos or a zip; 413 past it), and most bytes a zip may inflate to (422)."
    )
    decode_threads: int = Field(
        2, ge=1, description="Threads that decode uploaded pictures and zips: a pool of their own, so uploads never hold up other requests."
    )
    output_dir: Path = Field(Path("output"), description="Where generated PNGs are saved.")
    save_images: bool = Field(
        True,
        description="Save the images of /generate and /generate/image to SD_OUTPUT_DIR (jobs of POST /jobs always store theirs: their results link to them).",
    )
    cors_origins: list[str] = Field(
        ["http://localhost:3000", "http://localhost:5173"], description="Origins allowed by CORS, as a JSON list."
    )
    enable_xformers: bool = Field(True, description="Use xformers attention on CUDA when it is installed.")
    attention_slicing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on for MPS only (PyTorch SDPA already bounds attention memory on CUDA and CPU)."
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="UNet and VAE weights in channels_last memory format; auto: on CUDA (its convolutions run faster so), off elsewhere."
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet (its attention's query, key and value projections fused) and the VAE's "
        "decode (SD_COMPILE_VAE): compiled for each batch size of SD_COMPILE_BATCH_SIZES at each size of "
        "SD_COMPILE_SIZES before the model takes jobs (a batch is padded up to the next compiled size), the kernels "
        "kept in SD_COMPILE_CACHE_DIR for the next start. LoRA batches run compiled from LoRA slots (SD_COMPILE_LORA_RANK).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode: reduce-overhead adds CUDA graphs; the max-autotune modes search kernels (longer compiles)."
    )
    compile_batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description="Images per compiled UNet call, as a JSON list; a batch runs at the smallest that holds it. Unset: "
        "1, 2, 4, ... up to the most images in a batch (SD_MAX_BATCH_SIZE).",
    )
    compile_sizes: list[Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")]] = Field(
        [],
        description='Image sizes (WIDTHxHEIGHT, as a JSON list: ["512x512", "768x512"]) compiled before a model takes '
        "jobs, besides its native size; another size compiles on its first request.",
    )
    compile_lora_rank: int = Field(
        16,
        ge=0,
        description="Rank of the compiled UNet's LoRA slots: every LoRA up to this rank runs compiled, one adapter or "
        "many in a batch, with no recompile (adapters padded to it; the slots hold one adapter per image of the largest "
        "batch). A LoRA of a larger rank, or on layers past the attention and transformer projections, runs its batches "
        "uncompiled. 0: every LoRA batch runs uncompiled.",
    )
    compile_vae: bool = Field(
        True, description="With SD_COMPILE, torch.compile the VAE's decode too, at the UNet's batch and image sizes."
    )
    compile_cache_dir: Path | None = Field(
        None, description="Where compiled kernels are kept between starts (it sets TORCHINDUCTOR_CACHE_DIR); unset: .compile-cache in SD_MODELS_DIR."
    )
    safety_checker: bool = Field(False, description="Run the model's NSFW safety checker when it ships one.")
    max_batch_size: int | None = Field(
        None, ge=1, description="Most images in one pipeline call; unset: 8 on CUDA, 4 elsewhere (see docs/performance.md)."
    )
    batch_wait_ms: float = Field(
        10, ge=0, description="How long a batch waits for companions that recent traffic did not predict (a burst of new clients)."
    )
    batch_fill_wait_ms: float = Field(
        250,
        ge=0,
        description="How long a batch may wait for the companions recent traffic predicts: as many images of its shape as "
        "were queued or running in its last round (clients that just got their images send the next request at once).",
    )
    batch_across_adapters: bool = Field(
        True, description="Jobs of different LoRAs (and checkpoint users) on one base share a batch, each image with its own adapter."
    )
    training_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Share of a busy device's time that trainings get (a training slice runs whenever they have had "
        "less lately); 0: trainings run only while no batch is ready. An idle device trains all the time.",
    )
    preview_every: int = Field(
        5,
        ge=0,
        description="Every this many denoising steps, a running job's progress carries a preview of its image (a JPEG of "
        "at most 128 px, projected from the latents); 0: no previews.",
    )
    max_queue: int = Field(64, ge=1, description="Queued jobs past which users with jobs queued get 429.")
    queue_reserve: int = Field(
        16, ge=0, description="Places past SD_MAX_QUEUE for users with nothing queued: heavy users never lock out a light one."
    )
    scheduling: Literal["fair", "fifo"] = Field(
        "fair",
        description="fair: users share the device in proportion to their keys' weights, by cost (pixel-steps), "
        "interactive jobs first; fifo: the oldest job first (within a priority class).",
    )
    job_timeout_s: float = Field(600, gt=0, description="A job not finished this long after submission fails.")
    webhook_retries: int = Field(3, ge=0, description="Retries of a failed webhook delivery.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubles each time.")
    webhook_timeout_s: float = Field(
        10, gt=0, description="Deadline of one webhook delivery attempt, connection to status line (the body is never read)."
    )
    webhook_secret: str | None = Field(
        None,
        pattern=r"^whsec_[A-Za-z0-9+/]{22,}={0,2}$",
        description="A whsec_ secret that signs the webhooks of jobs and trainings no key's secret signs (open mode, keys "
        "made before secrets); unset: those go unsigned. Each key's own secret signs its jobs' webhooks.",
    )
    webhook_progress_interval_s: float = Field(
        2.0, gt=0, description="Least seconds between two progress webhooks of one job (webhook_events_filter: progress)."
    )
    data_dir: Path = Field(Path("data"), description="Where the embedded SQLite database lives.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; unset: SQLite in SD_DATA_DIR."
    )
    database_retry_s: float = Field(
        60, gt=0, description="How long a database operation is retried through locks and lost connections (503 after)."
    )
    database_lock_timeout_s: float = Field(
        10, gt=0, description="How long one attempt waits for a lock another process holds (SQLite busy timeout, PostgreSQL lock_timeout)."
    )
    storage: Literal["local", "s3"] = Field("local", description="Where images go: SD_OUTPUT_DIR, or an S3 bucket.")
    s3_bucket: str | None = Field(None, description="The bucket of SD_STORAGE=s3.")
    s3_prefix: str = Field("", description="Key prefix inside the bucket, e.g. images/.")
    s3_endpoint_url: str | None = Field(None, description="For S3-compatible stores (MinIO, R2, ...); unset: AWS.")
    s3_region: str | None = Field(None, description="The region of the bucket.")
    s3_url_expiry_s: int = Field(3600, ge=1, description="Lifetime of presigned image URLs.")
    retention_days: float | None = Field(
        None, gt=0, description="Delete finished jobs and their images older than this; unset: keep forever."
    )
    retention_interval_s: float = Field(3600, gt=0, description="How often the retention task runs.")
    auth: Literal["auto", "required", "off"] = Field(
        "auto", description="auto: keys are required as soon as one exists or SD_ADMIN_KEY is set; off: open."
    )
    admin_key: str | None = Field(None, description="An admin API key, stored (hashed) at start-up.")
    rate_limit: str | None = Field(
        "120/minute", description="Requests that change something (POST, PUT, DELETE) per API key, in `limits` notation; empty: none."
    )
    read_rate_limit: str | None = Field(
        "1200/minute", description="Reads (GET: jobs, events, images, ...) per API key, a budget of their own; empty: none."
    )
    rate_limit_storage: str = Field(
        "memory://", description="Where rate limits count: memory:// (this process), or redis://host:6379 (shared by replicas)."
    )
    max_active_jobs_per_user: int = Field(16, ge=1, description="Queued + running jobs one user may have.")
    max_queued_cost_per_user: int = Field(
        1024 * 1024 * 50 * 8,
        ge=1,
        description="Pixel-steps (width x height x steps x images) one user may have queued; a user with nothing queued "
        "may always queue one job.",
    )
    max_queued_cost_per_tenant: int | None = Field(
        None, ge=1, description="Pixel-steps the jobs of one tenant (an API key's owner) may have queued; unset: no cap."
    )
    session_secret: str | None = Field(
        None, description="Signs browser sessions (POST /session); unset: a random one per process (sessions end at a restart)."
    )
    session_ttl_s: int = Field(12 * 3600, ge=60, description="How long a browser session lasts.")
    session_samesite: Literal["strict", "lax", "none"] = Field(
        "strict",
        description="The session cookie's SameSite: none lets a frontend on another site (a page on localhost calling "
        "127.0.0.1, or app.example calling api.example) send it, and makes it Secure (HTTPS, or localhost in browsers).",
    )
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body accepted (413 past it).")
    max_image_body_bytes: int = Field(
        32 * 1024**2, ge=1024, description="Largest body of a request that carries images (img2img, inpainting; 413 past it)."
    )
    styles_file: Path | None = Field(
        Path("models/styles.csv"),
        description="Style presets in AUTOMATIC1111's styles.csv format (name,prompt,negative_prompt); GET /styles.",
    )
    max_pixel_steps: int = Field(
        1024 * 1024 * 50 * 2, ge=1, description="Cap on width x height x steps x images of one job (422 past it)."
    )
    webhook_allow_private: bool = Field(False, description="Allow webhooks to private, loopback, link-local hosts.")
    metrics_require_admin: bool = Field(False, description="Require an admin key for GET /metrics.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or as one JSON object each (with request ids).")
    log_probes: bool = Field(
        False, description="Access-log the health checks and metrics scrapes that succeed (GET /health, /health/ready, /metrics)."
    )
    max_training_steps: int = Field(3000, ge=1, description="Most steps one training may ask for (422 past it).")
    training_slice_steps: int = Field(
        5, ge=1, description="Training steps run between two generation batches: a generation waits at most one slice."
    )
    training_checkpoint_every: int = Field(50, ge=1, description="A training writes a checkpoint every this many steps.")
    training_sample_every: int = Field(
        100, ge=0, description="A running training draws its sample pictures every this many steps, to show how it learns (0: only at the end)."
    )
    training_min_photo_side: int = Field(256, ge=64, description="Shortest side a training photo may have (422 below it).")
    shutdown_timeout_s: float = Field(60, gt=0, description="How long shutdown waits for the running batch.")
    engine: Literal["local", "ray"] = Field(
        "local", description="local: one device in this process; ray: batches run on Ray Serve replicas (pip install -r requirements-ray.txt)."
    )
    ray_address: str | None = Field(
        None, description="SD_ENGINE=ray: the Ray cluster to join (auto, or host:6379); unset: start a local Ray on this machine."
    )
    ray_deploy: bool = Field(
        True, description="SD_ENGINE=ray: deploy the engine replicas; false: use the ones a KubeRay RayService deployed."
    )
    ray_replicas: int = Field(1, ge=1, description="SD_ENGINE=ray: replicas, each owning a device, its model cache and batching.")
    ray_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; unset: 1 when the Ray cluster has GPUs, else 0 (CPU replicas)."
    )
    ray_num_cpus: float = Field(1, ge=0, description="CPUs per replica (its torch threads on a CPU replica).")
    ray_models_per_replica: int = Field(
        2, ge=1, description="Base checkpoints one replica holds; past it Serve unloads its least recently used."
    )
    ray_autoscaling: dict | None = Field(
        None,
        description='Serve\'s autoscaling_config as JSON, e.g. {"min_replicas": 1, "max_replicas": 8, '
        '"target_ongoing_requests": 1}; replaces SD_RAY_REPLICAS.',
    )
    host: str = Field("0.0.0.0", description="The address to listen on (127.0.0.1: this machine only).")
    port: int = Field(8000, ge=1, le=65535, description="The port to listen on.")
    c2pa: bool = Field(True, description="Sign C2PA Content Credentials into every generated image (docs/provenance.md).")
    c2pa_cert: Path | None = Field(
        None, description="PEM certificate chain (signer first) the credentials are signed with; unset: a development pair "
        "made at first start under SD_DATA_DIR/c2pa (readers do not trust it). Set with SD_C2PA_KEY."
    )
    c2pa_key: Path | None = Field(None, description="PEM private key (unencrypted) of SD_C2PA_CERT's first certificate.")
    c2pa_trust_anchors: Path | None = Field(
        None, description="PEM CA certificates whose credentials POST /provenance/verify calls trusted, beside the signer's own issuers."
    )
    c2pa_record_generation: bool = Field(
        False, description="Also record the model id and the SHA-256 of the generation parameters in the credentials "
        "(off: the credentials say who made the image and how, not with which personal model)."
    )
    iptc_metadata: bool = Field(True, description="Write the IPTC digital source type (trainedAlgorithmicMedia) into each image's XMP.")
    watermark: bool = Field(True, description="Embed an invisible watermark (service id, job, image) in every image 128 pixels a side or more.")
    watermark_strength: float = Field(
        2.0, ge=1.0, le=8.0, description="The watermark's least amplitude, in levels of 255; the embedder raises it where a "
        "picture's texture calls for it, up to 4x (docs/provenance.md has the trade-off measured)."
    )
    watermark_service_id: int = Field(
        23901, ge=0, le=65535, description="The 16-bit id the watermark carries for this service (give each deployment its own)."
    )

    @cached_property
    def user_model_map(self) -> dict[str, str | dict]:
        """The configured user -> model mapping: the default user, then the JSON file, then ``SD_USER_MODELS``."""
        mapping: dict[str, str | dict] = {DEFAULT_USER: self.default_model}
        if self.user_models_file is not None:
            mapping.update(json.loads(self.user_models_file.read_text()))
        mapping.update(self.user_models)
        return mapping

    @property
    def effective_database_url(self) -> str:
        """SD_DATABASE_URL, or the embedded SQLite file under SD_DATA_DIR."""
        return self.database_url or f"sqlite:///{self.data_dir / 'sd-api.db'}"
