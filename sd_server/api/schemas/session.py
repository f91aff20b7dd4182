"""Browser sessions: what POST and GET /session take and answer."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
