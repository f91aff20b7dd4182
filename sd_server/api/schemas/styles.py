"""Style presets: what PUT /styles/{name} takes and GET /styles answers."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sd_server.domain.generation import MAX_PROMPT_CHARS
from sd_server.domain.models import Text


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
