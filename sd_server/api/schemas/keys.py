"""API keys: what POST /keys takes and answers."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sd_server.domain.models import USER_ID_PATTERN


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
