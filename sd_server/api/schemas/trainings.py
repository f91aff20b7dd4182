"""Trainings: the upload's form fields, a training as the API shows it, pages of trainings."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from sd_server.domain.generation import MAX_SEED
from sd_server.domain.models import Text, UserModel
from sd_server.domain.trainings import DEFAULT_CAPTION, MAX_CAPTION_CHARS, TrainingStatus, check_caption_template


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
    prior_loss_weight: float = Field(
        0.0, ge=0, le=10, allow_inf_nan=False, description="Prior preservation: weight of the loss on the base's own pictures of the class (0: off)."
    )
    class_images: int = Field(50, ge=1, le=200, description="Pictures of the class the base draws for prior preservation (cached).")
    face_check: bool | None = Field(
        None, description="Require one face per photo and crop around it; unset: when class_word names a person (person, woman, man, ...)."
    )
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
    prior_loss_weight: float
    class_images: int
    face_check: bool | None
    activate: bool
    sample_templates: list[str] = Field(..., description="Prompts of the sample pictures, {trigger} and {class_word} filled in when drawn.")
    evaluator: str | None = Field(..., description="What scores the samples (named by the base's recipe), if anything.")
    defaults_from: str = Field(..., description="Where the values the upload left out came from: the base model's recipe, or the built-in one.")


class ProgressSamples(BaseModel):
    """The samples a running training drew at one step: how it was learning."""

    step: int
    samples: list[str] = Field(..., description="URLs of the sample images at this step.")


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
    progress_samples: list[ProgressSamples] = Field(..., description="Samples drawn while it trained (every SD_TRAINING_SAMPLE_EVERY steps).")
    scores: dict[str, Any] | None = Field(
        ..., description="What the base's evaluator reads in the final samples (the demo model's: whether each shows the subject where its prompt put it)."
    )
    warnings: list[str] = Field(..., description="About the photos: near-duplicates left out, faces too small or blurry.")
    model: UserModel | None = Field(..., description="The LoRA it produced (the user's model when activate).")
    error: str | None
    links: TrainingLinks


class TrainingList(BaseModel):
    """A page of trainings, newest first."""

    trainings: list[TrainingResponse]
    total: int
    limit: int
    offset: int
