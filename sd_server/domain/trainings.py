"""Trainings: a user's own LoRA, learned from their photos. The settings a training runs with, its states, and
the record the API, the database and the device worker share."""

import asyncio
import enum
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sd_server.domain.jobs import utc_now
from sd_server.domain.lifecycle import Phase
from sd_server.domain.models import LoraModel

DEFAULT_CAPTION = "a photo of {trigger} {class_word}"
BUILT_IN_DEFAULTS = "built-in (SD1.5's DreamBooth-LoRA recipe)"
SAMPLE_PROMPTS = ("a photo of {trigger} {class_word}", "a close-up photo of {trigger} {class_word}")
MAX_SAMPLE_PROMPTS = 4
EVALUATORS = ("demo-world",)  # the demo model's: reads its pictures back (sd_server.demo.personalisation)
MAX_CAPTION_CHARS = 200  # a caption template; filled in, at most 200 + 22 x 32 characters (trigger, class word)
PERSON_WORDS = frozenset({"person", "woman", "man", "boy", "girl", "child", "kid", "baby", "lady", "guy", "human", "face", "selfie"})
TEMPLATE_FIELD = re.compile(r"\{(trigger|class_word)\}")


def check_caption_template(template: str) -> str:
    """``template`` when it is a caption template: at most MAX_CAPTION_CHARS, naming ``{trigger}``, and with no brace
    but those of ``{trigger}`` and ``{class_word}`` (it is filled by plain substitution, never by str.format);
    ValueError saying what is wrong otherwise."""
    if len(template) > MAX_CAPTION_CHARS:
        raise ValueError(f"at most {MAX_CAPTION_CHARS} characters")
    if "{trigger}" not in template:
        raise ValueError("must contain {trigger}, the word that names the subject")
    rest = TEMPLATE_FIELD.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError("may only contain {trigger} and {class_word} in braces (no other names, format specs or attributes)")
    return template


def check_recipe_extras(sample_templates: object, evaluator: object) -> None:
    """ValueError unless a recipe's sample prompts are 1 to MAX_SAMPLE_PROMPTS caption templates and its evaluator,
    if any, is one of EVALUATORS."""
    if not isinstance(sample_templates, (list, tuple)) or not 1 <= len(sample_templates) <= MAX_SAMPLE_PROMPTS:
        raise ValueError(f"sample_templates: 1 to {MAX_SAMPLE_PROMPTS} prompt templates")
    for template in sample_templates:
        check_caption_template(str(template))
    if evaluator is not None and evaluator not in EVALUATORS:
        raise ValueError(f"evaluator: one of {', '.join(EVALUATORS)}")


def fill_template(template: str, trigger: str, class_word: str) -> str:
    """``template`` with each ``{trigger}`` and ``{class_word}`` replaced; any other text is kept as it is."""
    values = {"trigger": trigger, "class_word": class_word}
    return TEMPLATE_FIELD.sub(lambda field: values[field.group(1)], template)


class TrainingStatus(str, enum.Enum):
    """Where a training is: waiting, loading the base and encoding the photos, training, or ended."""

    queued = "queued"
    preparing = "preparing"
    training = "training"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def phase(self) -> Phase:
        """The lifecycle phase this status stands for ("training" is the running phase)."""
        return Phase.running if self is TrainingStatus.training else Phase(self.value)

    @property
    def is_terminal(self) -> bool:
        """True for the states a training never leaves."""
        return self.phase.is_terminal


@dataclass(frozen=True)
class TrainingSettings:
    """What a training learns and how: the words its captions use, and the DreamBooth-LoRA hyperparameters."""

    trigger: str = "sks"
    class_word: str = "person"
    caption: str = DEFAULT_CAPTION
    steps: int = 500
    rank: int = 8
    learning_rate: float = 1e-4
    resolution: int = 512
    seed: int = 0
    batch_size: int = 1
    snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    prior_loss_weight: float = 0.0  # DreamBooth's prior preservation: 0 turns it off
    class_images: int = 50  # pictures of the class the base draws, learned beside the photos when the weight is set
    face_check: bool | None = None  # one face per photo required; None: when the class word names a person
    activate: bool = True
    defaults_from: str = BUILT_IN_DEFAULTS  # where the values the upload left out came from
    sample_templates: tuple[str, ...] = SAMPLE_PROMPTS  # a base's recipe may name its own
    evaluator: str | None = None  # a base's recipe may name one that scores the samples (EVALUATORS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_templates", tuple(self.sample_templates))  # a list when read back from JSON

    def captioned(self, template: str) -> str:
        """``template`` with this training's trigger and class word filled in."""
        return fill_template(template, self.trigger, self.class_word)

    @property
    def caption_text(self) -> str:
        """The caption every photo is trained with."""
        return self.captioned(self.caption)

    @property
    def requires_faces(self) -> bool:
        """One face per photo is required: asked for, or unasked when the class word names a person."""
        return self.face_check if self.face_check is not None else self.class_word.strip().lower() in PERSON_WORDS

    @property
    def looks_for_faces(self) -> bool:
        """Photos are cropped around the face: a person's (even with the check off), or any with the check on."""
        return self.face_check is True or self.class_word.strip().lower() in PERSON_WORDS

    @property
    def class_prompt(self) -> str:
        """The caption with the class word in the trigger's place: what the base draws for prior preservation."""
        template = self.caption.replace("{trigger} {class_word}", "{class_word}")
        filled = fill_template(template, self.class_word if "{class_word}" not in template else "", self.class_word)
        return " ".join(filled.split()).strip(" ,;:")

    @property
    def sample_prompts(self) -> list[str]:
        """The fixed prompts of the samples drawn with the trained adapter."""
        return [self.captioned(template) for template in self.sample_templates]


@dataclass
class Training:
    """One training, from upload to the LoRA it produced (or its error)."""

    user_id: str
    base: str
    settings: TrainingSettings
    photo_count: int
    webhook_url: str | None = None
    key_id: str | None = None  # the API key that submitted it: its secret signs the webhook
    idempotency_key: str | None = None
    fingerprint: str = ""
    request_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: TrainingStatus = TrainingStatus.queued
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = 0
    checkpoint_step: int = 0
    loss: float | None = None
    seconds_per_step: float | None = None
    attempts: int = 0
    samples: list[str] = field(default_factory=list)
    progress_samples: dict[int, list[str]] = field(default_factory=dict)  # step -> sample keys, drawn while it ran
    warnings: list[str] = field(default_factory=list)  # about the photos: near-duplicates left out, tiny or blurry faces
    scores: dict[str, Any] | None = None  # the recipe's evaluator's reading of the final samples
    model: LoraModel | None = None
    error: str | None = None
    error_status: int | None = None
    cancel_requested: bool = False
    committed: bool = False  # past its last step and past the point a cancel can stop (Trainings._finish)
    deleted: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def progress_sample_keys(self) -> list[str]:
        """The keys of every sample drawn while it ran, all steps together."""
        return [key for keys in self.progress_samples.values() for key in keys]

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent pace, once there is one."""
        if self.seconds_per_step is None or self.status.is_terminal:
            return None
        return round((self.settings.steps - self.step) * self.seconds_per_step, 1)


class TrainingStore(Protocol):
    """Keeps training records durably."""

    def add(self, training: Training) -> Training: ...

    def save(self, training: Training) -> None: ...

    def get(self, training_id: str) -> Training | None: ...

    def delete(self, training_id: str) -> None: ...

    def find_by_idempotency_key(self, key: str) -> Training | None: ...

    def page(self, user_id: str | None, limit: int, offset: int) -> tuple[list[Training], int]: ...

    def unfinished(self) -> list[Training]: ...
