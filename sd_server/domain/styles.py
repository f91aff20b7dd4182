"""Style presets as AUTOMATIC1111 keeps them: a name, a prompt and a negative prompt, where ``{prompt}`` stands for
the request's own prompt (without it, the style's text is appended after a comma)."""

import csv
import io
from dataclasses import dataclass
from typing import Literal

PROMPT_PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    """One preset, and where it comes from: SD_STYLES_FILE, or the API (which overrides the file)."""

    name: str
    prompt: str
    negative_prompt: str
    origin: Literal["file", "api"] = "file"


def merge_prompt(style_text: str, prompt: str) -> str:
    """``prompt`` with a style's text applied, as A1111 does: into its ``{prompt}``, else appended after ", "."""
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(styles: list[Style], prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """The effective prompts after applying ``styles`` in order (a negative prompt stays None if nothing adds one)."""
    negative = negative_prompt or ""
    for style in styles:
        prompt = merge_prompt(style.prompt, prompt)
        negative = merge_prompt(style.negative_prompt, negative)
    return prompt, negative or None


def parse_styles_csv(text: str) -> list[Style]:
    """The presets of an A1111 styles.csv (columns name, prompt, negative_prompt; a header row; blank names skipped)."""
    rows = csv.DictReader(io.StringIO(text))
    return [
        Style(row["name"].strip(), (row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
        for row in rows
        if (row.get("name") or "").strip()
    ]
