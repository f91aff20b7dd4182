"""The style book: presets from SD_STYLES_FILE (A1111's styles.csv, re-read when it changes), overridden and
extended by those an admin sets through the API, kept in the database."""

import logging
import threading
from pathlib import Path

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from config import Settings
from sd_server.domain.jobs import utc_now
from sd_server.domain.styles import PromptTooLongError, Style, apply_styles, parse_styles_csv
from sd_server.errors import ConflictError, InvalidFieldError, NotFoundError
from sd_server.persistence.retry import in_session
from sd_server.persistence.tables import StyleRow

logger = logging.getLogger(__name__)


class StyleBook:
    """Every style preset by name: the file's, then the API's on top."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.path, self.engine, self.retry_s = settings.styles_file, engine, settings.database_retry_s
        self._lock = threading.Lock()
        self._file_styles: dict[str, Style] = {}
        self._file_stamp: float | None = None
        rows = in_session(engine, lambda session: list(session.scalars(select(StyleRow))), "reading the styles", self.retry_s)
        self._api_styles = {row.name: Style(row.name, row.prompt, row.negative_prompt, "api") for row in rows}

    def all(self) -> list[Style]:
        """Every preset, by name."""
        styles = self._by_name()
        return [styles[name] for name in sorted(styles, key=str.casefold)]

    def get(self, name: str) -> Style:
        """The preset ``name``; NotFoundError when there is none."""
        style = self._by_name().get(name)
        if style is None:
            raise NotFoundError(f"no style '{name}'; GET /styles lists them")
        return style

    def apply(self, names: list[str], prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
        """The effective prompts with the presets ``names`` applied in order (the prompts as they are without any);
        422 naming an unknown one, or when a prompt would pass MAX_PROMPT_CHARS with them."""
        if not names:
            return prompt, negative_prompt
        styles = self._by_name()
        unknown = [name for name in names if name not in styles]
        if unknown:
            raise InvalidFieldError(f"unknown style(s) {', '.join(unknown)}; GET /styles lists them", field="styles")
        try:
            return apply_styles([styles[name] for name in names], prompt, negative_prompt)
        except PromptTooLongError as error:
            raise InvalidFieldError(str(error), field="styles") from error

    def put(self, name: str, prompt: str, negative_prompt: str) -> tuple[Style, bool]:
        """Create or replace the preset ``name`` in the database; returns it and whether it is new."""
        def write(session: Session) -> None:
            row = session.get(StyleRow, name) or StyleRow(name=name)
            row.prompt, row.negative_prompt, row.updated_at = prompt, negative_prompt, utc_now()
            session.add(row)

        in_session(self.engine, write, f"storing style {name}", self.retry_s, write=True)
        style = Style(name, prompt, negative_prompt, "api")
        with self._lock:
            created = name not in self._api_styles and name not in self._file_styles  # new to GET /styles
            self._api_styles[name] = style
        return style, created

    def delete(self, name: str) -> None:
        """Delete the preset ``name`` set through the API; 409 for one that only the file defines."""
        with self._lock:
            in_api = name in self._api_styles
        if not in_api:
            self.get(name)  # 404 when there is no such style at all
            raise ConflictError(f"style '{name}' comes from SD_STYLES_FILE; edit that file to remove it")
        in_session(self.engine, lambda session: session.execute(delete(StyleRow).where(StyleRow.name == name)), f"deleting style {name}", self.retry_s, write=True)
        with self._lock:
            self._api_styles.pop(name, None)

    def _by_name(self) -> dict[str, Style]:
        """Every preset by name: the file's, with the API's over them."""
        file_styles = self._read_file()
        with self._lock:
            return {**file_styles, **self._api_styles}

    def _read_file(self) -> dict[str, Style]:
        """The file's presets, read again when its modification time changed; a file that cannot be read is logged
        and its last good contents kept."""
        if self.path is None:
            return {}
        try:
            stamp = self.path.stat().st_mtime
            if stamp != self._file_stamp:
                styles = {style.name: style for style in parse_styles_csv(Path(self.path).read_text(encoding="utf-8-sig"))}
                with self._lock:
                    self._file_styles, self._file_stamp = styles, stamp
        except FileNotFoundError:
            with self._lock:
                self._file_styles, self._file_stamp = {}, None
        except (OSError, UnicodeDecodeError, KeyError) as error:
            logger.warning("could not read SD_STYLES_FILE %s (%s); keeping the styles read before", self.path, error)
        with self._lock:
            return dict(self._file_styles)
