"""The user -> model registry: the settings' mapping, overridden by changes made through the API and kept in the
database; and the checks that a model's sources stay inside SD_MODELS_DIR."""

import re
import threading
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from config import Settings
from sd_server.domain.jobs import utc_now
from sd_server.domain.models import (
    DEFAULT_USER,
    USER_MODEL,
    LoraModel,
    UserModel,
    parse_model,
)
from sd_server.errors import DefaultUserError, InvalidSourceError, UnknownUserError
from sd_server.persistence.retry import in_session
from sd_server.persistence.tables import UserModelRow
from sd_server.storage.model_files import lora_file

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelRegistry:
    """Which model serves which user: SD_DEFAULT_MODEL and SD_USER_MODELS(_FILE), then the API's changes on top."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.models_dir = settings.models_dir
        self.engine, self.retry_s = engine, settings.database_retry_s
        self._lock = threading.Lock()
        self._models: dict[str, UserModel] = {user: parse_model(value) for user, value in settings.user_model_map.items()}
        self._from_api: set[str] = set()
        self.fallback = parse_model(settings.fallback_model) if settings.fallback_model else None
        rows = in_session(engine, lambda session: list(session.scalars(select(UserModelRow))), "reading the registry", self.retry_s)
        for row in rows:
            self._apply(row.user_id, USER_MODEL.validate_json(row.spec) if row.spec else None)

    def get(self, user_id: str) -> UserModel:
        """The model of ``user_id``'s own; raises UnknownUserError when there is none."""
        with self._lock:
            model = self._models.get(user_id)
        if model is None:
            raise UnknownUserError(
                f"user '{user_id}' has no model of their own: train one from photos with POST /users/{user_id}/trainings, "
                f"or ask an admin to set one (PUT /users/{user_id}/model, or SD_USER_MODELS); an operator may serve such "
                "users a base model with SD_FALLBACK_MODEL"
            )
        return model

    def serving(self, user_id: str) -> UserModel:
        """The model that generates for ``user_id``: their own, else SD_FALLBACK_MODEL; UnknownUserError without either."""
        if self.fallback is not None:
            with self._lock:
                own = self._models.get(user_id)
            return own or self.fallback
        return self.get(user_id)

    def base_for_training(self, user_id: str) -> str:
        """The checkpoint a new LoRA of ``user_id`` trains on: the base of their model, else SD_FALLBACK_MODEL's, else
        the default user's."""
        with self._lock:
            model = self._models.get(user_id) or self.fallback or self._models.get(DEFAULT_USER)
        if model is None:
            raise UnknownUserError(f"user '{user_id}' has no model and there is no default model (SD_DEFAULT_MODEL)")
        return model.base

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
                raise InvalidSourceError(str(error), field="source") from error
        else:
            self.check_checkpoint(model.source, "source")

    def check_checkpoint(self, source: str, field: str) -> None:
        """Raise InvalidSourceError unless ``source`` is a pipeline folder inside SD_MODELS_DIR, or a hub id."""
        path = self._inside_models_dir(source, field)
        if path is not None and not (path / "model_index.json").is_file():
            raise InvalidSourceError(f"'{source}' is not a diffusers pipeline folder (no model_index.json)", field=field)
        if path is None and not HUB_ID.match(source):
            raise InvalidSourceError(f"no folder '{source}' under SD_MODELS_DIR, and not a hub id (owner/name)", field=field)

    def _inside_models_dir(self, source: str, field: str) -> Path | None:
        """The existing path ``source`` names; InvalidSourceError when it resolves outside SD_MODELS_DIR."""
        root = self.models_dir.resolve()
        try:
            path = (root / source).resolve()
            exists = path.exists()
        except (OSError, ValueError) as error:  # a NUL byte, a name too long for the file system
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise InvalidSourceError(f"'{source[:100]}' is not a usable path: {reason}", field=field) from error
        if not path.is_relative_to(root):
            raise InvalidSourceError(f"'{source}' resolves outside SD_MODELS_DIR; put the model under it", field=field)
        return path if exists else None

    def _apply(self, user_id: str, model: UserModel | None) -> None:
        if model is None:
            self._models.pop(user_id, None)
        else:
            self._models[user_id] = model
        self._from_api.add(user_id)

    def _persist(self, user_id: str, model: UserModel | None) -> None:
        def write(session: Session) -> None:
            row = session.get(UserModelRow, user_id) or UserModelRow(user_id=user_id)
            row.spec = USER_MODEL.dump_json(model).decode() if model is not None else None
            row.updated_at = utc_now()
            session.add(row)

        in_session(self.engine, write, f"storing the model of user {user_id}", self.retry_s, write=True)
