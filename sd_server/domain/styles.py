"""Style presets as AUTOMATIC1111 keeps them: a name, a prompt and a negative prompt, where ``{prompt}`` stands for
the request's own prompt (without it, the style's text is appended after a comma)."""

import csv
import io
from dataclasses import dataclass
from typing import Literal

from sd_server.domain.generation import MAX_PROMPT_CHARS

PROMPT_PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    """One preset, and where it comes from: SD_STYLES_FILE, or the API (which overrides the file)."""

    name: str
    prompt: str
    negative_prompt: str
    origin: Literal["file", "api"] = "file"


class PromptTooLongError(ValueError):
    """Applying a style would make a prompt longer than its cap."""


def merge_prompt(style_text: str, prompt: str, max_chars: int = MAX_PROMPT_CHARS, what: str = "prompt") -> str:
    """``prompt`` with a style's text applied, as A1111 does: into its ``{prompt}``, else appended after ", ".
    PromptTooLongError naming ``what``, before the text is built, when the result would pass ``max_chars``."""
    placeholders = style_text.count(PROMPT_PLACEHOLDER)
    parts = [part for part in (prompt.strip(), style_text.strip()) if part]
    if placeholders:
        length = len(style_text) + placeholders * (len(prompt) - len(PROMPT_PLACEHOLDER))
    else:
        length = sum(map(len, parts)) + len(", ") * (len(parts) - 1)
    if length > max_chars:
        raise PromptTooLongError(f"the {what} would be {length} characters with the styles applied; at most {max_chars}")
    return style_text.replace(PROMPT_PLACEHOLDER, prompt) if placeholders else ", ".join(parts)


def apply_styles(
    styles: list[Style], prompt: str, negative_prompt: str | None, max_chars: int = MAX_PROMPT_CHARS
) -> tuple[str, str | None]:
    """The effective prompts after applying ``styles`` in order (a negative prompt stays None if nothing adds one);
    PromptTooLongError when either would pass ``max_chars``, checked at each style before its text is built."""
    negative = negative_prompt or ""
    for style in styles:
        prompt = merge_prompt(style.prompt, prompt, max_chars)
        negative = merge_prompt(style.negative_prompt, negative, max_chars, "negative prompt")
    return prompt, negative or None


def parse_styles_csv(text: str) -> list[Style]:
    """The presets of an A1111 styles.csv (columns name, prompt, negative_prompt; a header row; blank names skipped;
    NUL characters dropped)."""
    rows = csv.DictReader(io.StringIO(text.replace("\x00", "")))  # a NUL could reach no database as a job's prompt
    return [
        Style(row["name"].strip(), (row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
        for row in rows
        if (row.get("name") or "").strip()
    ]
