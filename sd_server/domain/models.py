"""What a user's model is: a full checkpoint, or a LoRA adapter on a base checkpoint."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

DEFAULT_USER = "default"
USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def storable(text: str) -> str:
    """Refuse text that UTF-8 or a database cannot carry: a lone surrogate such as \\ud800, or a NUL character
    (both of which JSON can spell; PostgreSQL refuses NUL in text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"must be valid Unicode text; character {error.start} is a lone surrogate") from error
    if "\x00" in text:
        raise ValueError(f"must not contain a NUL character (\\u0000, at character {text.index(chr(0))})")
    return text


Text = Annotated[str, AfterValidator(storable)]


class CheckpointModel(BaseModel):
    """A full Stable Diffusion checkpoint: a hub id, or a diffusers folder under SD_MODELS_DIR."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["checkpoint"] = "checkpoint"
    source: Text = Field(..., min_length=1, max_length=500, examples=["Zhurah/sd15-dreambooth-photoai"])

    @property
    def base(self) -> str:
        """The checkpoint whose pipeline runs this model: itself."""
        return self.source

    @property
    def label(self) -> str:
        """The model id that jobs, PNG metadata and logs show."""
        return self.source


class LoraModel(BaseModel):
    """A LoRA adapter (a .safetensors file, or a folder with one, under SD_MODELS_DIR) on a base checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lora"] = "lora"
    base: Text = Field(..., min_length=1, max_length=500, description="The checkpoint it applies to (as a checkpoint source).")
    source: Text = Field(..., min_length=1, max_length=500, examples=["loras/alice.safetensors"])
    scale: float = Field(1.0, ge=0.0, le=4.0, allow_inf_nan=False, description="Strength of the adapter.")

    @property
    def label(self) -> str:
        """The model id that jobs, PNG metadata and logs show."""
        return f"{self.base}+{self.source}" + ("" if self.scale == 1.0 else f"@{self.scale:g}")


UserModel = Annotated[CheckpointModel | LoraModel, Field(discriminator="kind")]
USER_MODEL = TypeAdapter(UserModel)


def parse_model(value: str | dict[str, object]) -> UserModel:
    """A mapping value of the settings: a checkpoint id (the simple form), or a model object."""
    return CheckpointModel(source=value) if isinstance(value, str) else USER_MODEL.validate_python(value)
