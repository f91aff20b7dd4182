"""API keys: what POST /keys takes and answers."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sd_server.domain.jobs import Priority
from sd_server.domain.models import USER_ID_PATTERN


class KeyCreateRequest(BaseModel):
    """A new API key's owner, role, and its user's weight and priority class."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": "alice", "role": "user"}]})

    user_id: str = Field(..., pattern=USER_ID_PATTERN, description="The user the key acts as.")
    role: Literal["user", "admin"] = Field("user", description="admin: every user, keys, cache and registry.")
    weight: float = Field(
        1.0, gt=0, le=1000, description="Its user's share of the device relative to other users' (2: twice a user of weight 1)."
    )
    priority: Priority = Field(
        Priority.interactive, description="batch: every job of the key leads only once no interactive job is queued."
    )


class KeyInfo(BaseModel):
    """An API key without the key itself."""

    id: str
    user_id: str
    role: str
    prefix: str = Field(..., description="The key's first characters, to tell keys apart.")
    created_at: datetime
    weight: float
    priority: Priority


class KeyCreated(BaseModel):
    """A new API key: `key` is shown this once and stored only as a hash; `webhook_secret` signs its jobs' webhooks."""

    id: str
    key: str
    webhook_secret: str = Field(..., description="Verifies the webhooks of this key's jobs (Standard Webhooks); shown once.")
    user_id: str
    role: str
    weight: float
    priority: Priority


class WebhookSecret(BaseModel):
    """A key's new webhook secret, shown this once: deliveries from now on are signed with it."""

    id: str
    webhook_secret: str
