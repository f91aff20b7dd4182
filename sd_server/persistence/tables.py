"""The tables: jobs and their images, API keys, the user -> model registry's changes, the webhook outbox,
trainings, style presets, and browser sessions."""

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """Base of every table."""


class JobRow(Base):
    """A job: who, which model, every parameter, and how it went."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(500))
    model_spec: Mapped[str | None] = mapped_column(Text, doc="the user's model at submission, as JSON (null: a checkpoint)")
    status: Mapped[str] = mapped_column(String(16), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    num_inference_steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    num_images: Mapped[int] = mapped_column(Integer)
    scheduler: Mapped[str | None] = mapped_column(String(32), doc="as requested (null: the model's own)")
    scheduler_used: Mapped[str | None] = mapped_column(String(64))
    image_input: Mapped[str | None] = mapped_column(Text, doc="img2img/inpainting: the ImageInput as JSON (null: txt2img)")
    styles: Mapped[str | None] = mapped_column(Text, doc="the style presets applied, as a JSON list")
    hires: Mapped[str | None] = mapped_column(Text, doc="hires fix: the Hires as JSON (null: none)")
    seed: Mapped[int] = mapped_column(BigInteger)
    synchronous: Mapped[bool]
    webhook_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(300), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    generation_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    error_status: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(128), doc="X-Request-ID of the request that submitted it")
    priority: Mapped[str | None] = mapped_column(String(16), doc="interactive or batch (null: interactive)")
    weight: Mapped[float | None] = mapped_column(Float, doc="its user's share of the device (null: 1)")
    tenant: Mapped[str | None] = mapped_column(String(64), doc="whose queued-cost cap it counts against (null: its user)")
    key_id: Mapped[str | None] = mapped_column(String(32), doc="the API key that submitted it (its secret signs the webhooks)")
    webhook_events: Mapped[str | None] = mapped_column(String(64), doc="events delivered, comma-separated (null: completed)")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    images: Mapped[list["ImageRow"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="ImageRow.position", lazy="selectin"
    )


class ImageRow(Base):
    """One image of a job: where it is stored, its size and checksum."""

    __tablename__ = "job_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str | None] = mapped_column(String(300), unique=True, doc="null: not stored")
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    job: Mapped[JobRow] = relationship(back_populates="images")


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, when created."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="the first characters, to tell keys apart")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    weight: Mapped[float | None] = mapped_column(Float, doc="its user's share of the device (null: 1)")
    priority: Mapped[str | None] = mapped_column(String(16), doc="interactive or batch (null: interactive)")
    webhook_secret: Mapped[str | None] = mapped_column(String(64), doc="signs its jobs' webhooks (null: SD_WEBHOOK_SECRET)")


class UserModelRow(Base):
    """A user's model as set through the API; it overrides the settings' mapping, and ``removed`` hides a user."""

    __tablename__ = "user_models"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[str | None] = mapped_column(Text, doc="the model as JSON; null: removed")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookDeliveryRow(Base):
    """A webhook delivery in the outbox: pending until delivered, or failed after its last retry."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    training_id: Mapped[str | None] = mapped_column(ForeignKey("trainings.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text, doc="the job (or training) JSON to POST")
    message_id: Mapped[str | None] = mapped_column(String(40), doc="its webhook-id, the same at every attempt")
    key_id: Mapped[str | None] = mapped_column(String(32), doc="the key whose secret signs it (null: SD_WEBHOOK_SECRET)")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)


class TrainingRow(Base):
    """A training: whose, on which base, its settings, how far it got, and the LoRA it produced."""

    __tablename__ = "trainings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    base: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), index=True)
    settings: Mapped[str] = mapped_column(Text, doc="the TrainingSettings as JSON")
    photo_count: Mapped[int] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    key_id: Mapped[str | None] = mapped_column(String(32), doc="the API key that submitted it (its secret signs the webhook)")
    idempotency_key: Mapped[str | None] = mapped_column(String(300), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    checkpoint_step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    seconds_per_step: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer)
    samples: Mapped[str] = mapped_column(Text, doc="storage keys of the sample images, as a JSON list")
    progress_samples: Mapped[str | None] = mapped_column(Text, nullable=True, doc="sample keys drawn while it ran, by step, as a JSON object")
    scores: Mapped[str | None] = mapped_column(Text, nullable=True, doc="its recipe's evaluator's reading of the final samples, as JSON")
    warnings: Mapped[str | None] = mapped_column(Text, nullable=True, doc="about its photos (near-duplicates left out, tiny or blurry faces), as a JSON list")
    model_spec: Mapped[str | None] = mapped_column(Text, doc="the LoRA model it produced, as JSON")
    error: Mapped[str | None] = mapped_column(Text)
    error_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StyleRow(Base):
    """A style preset set through the API (it overrides one of the same name in SD_STYLES_FILE)."""

    __tablename__ = "styles"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BrowserSessionRow(Base):
    """A browser session (POST /session): live while its row is here and unexpired; signing out deletes it, so the
    cookie stops working at once on every replica."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
