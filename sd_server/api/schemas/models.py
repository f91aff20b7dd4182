"""Users' models: what GET, PUT /users/{user_id}/model answer."""

from typing import Literal

from pydantic import BaseModel, Field

from sd_server.domain.models import UserModel

USER_MODEL_EXAMPLES = [
    {"kind": "checkpoint", "source": "Zhurah/sd15-dreambooth-photoai"},
    {"kind": "lora", "base": "demo", "source": "loras/alice.safetensors", "scale": 0.8},
]


class UserModelResponse(BaseModel):
    """A user's model, and where it comes from."""

    user_id: str
    model: UserModel
    origin: Literal["settings", "api"] = Field(
        ..., description="settings: SD_DEFAULT_MODEL / SD_USER_MODELS(_FILE); api: set by PUT or POST /users/{user_id}/..."
    )
