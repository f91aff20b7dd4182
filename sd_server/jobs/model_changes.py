"""What follows a change of a user's model: the model they had leaves memory unless another user still runs on it."""

from sd_server.domain.models import LoraModel, UserModel
from sd_server.engine.interface import Engine
from sd_server.registry import ModelRegistry


def unload_if_unused(model: UserModel | None, registry: ModelRegistry, engine: Engine) -> None:
    """Unload a model that no user runs on any more: a LoRA comes off its base, a checkpoint leaves memory."""
    if model is None or registry.is_used(model):
        return
    if isinstance(model, LoraModel):
        engine.unload_adapter(model)
    else:
        engine.unload(model.source)
