"""The user -> model registry: the settings' mapping, overridden by changes made through the API and kept in the database."""

import re
import threading
from pathlib import Path

from pydantic import TypeAdapter
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from config import DEFAULT_USER, Settings
from database import UserModelRow
from jobs import utc_now
from schemas import CheckpointModel, LoraModel, UserModel

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
USER_MODEL = TypeAdapter(UserModel)


class UnknownUserError(LookupError):
    """The user has no model: answered with 404."""


class InvalidSourceError(ValueError):
    """A model source that is not allowed or does not exist: answered with 422 at ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DefaultUserError(RuntimeError):
    """The default user's model cannot be removed, only replaced: answered with 409."""


def parse_model(value: str | dict) -> UserModel:
    """A mapping value of the settings: a checkpoint id (the simple form), or a model object."""
    return CheckpointModel(source=value) if isinstance(value, str) else USER_MODEL.validate_python(value)


def local_path(models_dir: Path, source: str) -> Path | None:
    """The file or folder that ``source`` names (under SD_MODELS_DIR, or absolute), or None when there is none."""
    path = models_dir / source
    return path if path.exists() else None


def checkpoint_location(models_dir: Path, source: str) -> str:
    """What ``from_pretrained`` gets: the folder under SD_MODELS_DIR when there is one, else the hub id."""
    path = local_path(models_dir, source)
    return str(path) if path is not None and path.is_dir() else source


def lora_file(models_dir: Path, source: str) -> Path:
    """The .safetensors file of a LoRA source: the file itself, or the one in its folder."""
    path = local_path(models_dir, source)
    if path is not None and path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        preferred = [candidate for candidate in candidates if candidate.name == "pytorch_lora_weights.safetensors"]
        path = (preferred or candidates or [None])[0]
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no LoRA .safetensors file at '{source}' under SD_MODELS_DIR")
    return path


class ModelRegistry:
    """Which model serves which user: SD_DEFAULT_MODEL and SD_USER_MODELS(_FILE), then the API's changes on top."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.models_dir = settings.models_dir
        self.engine = engine
        self._lock = threading.Lock()
        self._models: dict[str, UserModel] = {user: parse_model(value) for user, value in settings.user_model_map.items()}
        self._from_api: set[str] = set()
        with Session(engine) as session:
            for row in session.scalars(select(UserModelRow)):
                self._apply(row.user_id, USER_MODEL.validate_json(row.spec) if row.spec else None)

    def get(self, user_id: str) -> UserModel:
        """The model of ``user_id``; raises UnknownUserError when there is none."""
        with self._lock:
            model = self._models.get(user_id)
        if model is None:
            raise UnknownUserError(
                f"user '{user_id}' has no model; set one with PUT /users/{user_id}/model, or in SD_USER_MODELS"
            )
        return model

    def origin(self, user_id: str) -> str:
        """``api`` when the user's model was set through the API, else ``settings``."""
        return "api" if user_id in self._from_api else "settings"

    def all(self) -> dict[str, UserModel]:
        """Every user and their model."""
        with self._lock:
            return dict(self._models)

    def is_used(self, model: UserModel) -> bool:
        """True when some user runs on ``model``'s weights (its checkpoint, or its LoRA file)."""
        with self._lock:
            models = list(self._models.values())
        if isinstance(model, LoraModel):
            return any(isinstance(other, LoraModel) and other.source == model.source for other in models)
        return any(other.base == model.source for other in models)

    def set(self, user_id: str, model: UserModel) -> UserModel | None:
        """Give ``user_id`` this model, in memory and in the database; returns the model it had."""
        self._persist(user_id, model)
        with self._lock:
            previous = self._models.get(user_id)
            self._apply(user_id, model)
        return previous

    def remove(self, user_id: str) -> UserModel:
        """Take ``user_id``'s model away (also one from the settings, for good); returns it."""
        if user_id == DEFAULT_USER:
            raise DefaultUserError("the default user's model cannot be removed; PUT another one, or set SD_DEFAULT_MODEL")
        model = self.get(user_id)
        self._persist(user_id, None)
        with self._lock:
            self._apply(user_id, None)
        return model

    def check_sources(self, model: UserModel) -> None:
        """Raise InvalidSourceError unless every local path stays inside SD_MODELS_DIR and exists (or is a hub id)."""
        if isinstance(model, LoraModel):
            self.check_checkpoint(model.base, "base")
            self._inside_models_dir(model.source, "source")
            try:
                lora_file(self.models_dir, model.source)
            except FileNotFoundError as error:
                raise InvalidSourceError("source", str(error)) from error
        else:
            self.check_checkpoint(model.source, "source")

    def check_checkpoint(self, source: str, field: str) -> None:
        """Raise InvalidSourceError unless ``source`` is a pipeline folder inside SD_MODELS_DIR, or a hub id."""
        path = self._inside_models_dir(source, field)
        if path is not None and not (path / "model_index.json").is_file():
            raise InvalidSourceError(field, f"'{source}' is not a diffusers pipeline folder (no model_index.json)")
        if path is None and not HUB_ID.match(source):
            raise InvalidSourceError(field, f"no folder '{source}' under SD_MODELS_DIR, and not a hub id (owner/name)")

    def _inside_models_dir(self, source: str, field: str) -> Path | None:
        """The existing path ``source`` names; InvalidSourceError when it resolves outside SD_MODELS_DIR."""
        root = self.models_dir.resolve()
        try:
            path = (root / source).resolve()
            exists = path.exists()
        except (OSError, ValueError) as error:  # a NUL byte, a name too long for the file system
            raise InvalidSourceError(field, f"'{source[:100]}' is not a usable path: {error}") from error
        if not path.is_relative_to(root):
            raise InvalidSourceError(field, f"'{source}' resolves outside SD_MODELS_DIR ({root}); put the model under it")
        return path if exists else None

    def _apply(self, user_id: str, model: UserModel | None) -> None:
        if model is None:
            self._models.pop(user_id, None)
        else:
            self._models[user_id] = model
        self._from_api.add(user_id)

    def _persist(self, user_id: str, model: UserModel | None) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(UserModelRow, user_id) or UserModelRow(user_id=user_id)
            row.spec = USER_MODEL.dump_json(model).decode() if model is not None else None
            row.updated_at = utc_now()
            session.add(row)
