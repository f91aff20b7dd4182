"""docs/configuration.md, generated from the Settings class: every variable with its type, default, bounds and
description. Regenerate with ``python -m sd_server.settings_reference > docs/configuration.md``; a test fails when
the file and the class drift apart."""

import json
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from config import Settings

HEADER = """# Configuration

<!-- Generated from config.py by `python -m sd_server.settings_reference > docs/configuration.md`; do not edit. -->

One pydantic-settings class (`config.py`), read from environment variables with the prefix `SD_` and from a `.env`
file in the working directory. An invalid value stops the start with a message naming it. Lists and mappings are
JSON. `start.sh` also reads `PYTHON` (the interpreter that creates the venv, default `python3`), `SD_VENV` (default
`.venv`) and `SD_TORCH_INDEX_URL` (the index torch is installed from: see [Operations](operations-and-security.md)).

| variable | type | default | bounds | meaning |
|---|---|---|---|---|
"""
BOUND_SIGNS = {Ge: ("≥", "ge"), Gt: ("&gt;", "gt"), Le: ("≤", "le"), Lt: ("&lt;", "lt")}


def type_name(field: FieldInfo) -> str:
    """The field's type as a reader says it (choices listed)."""
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    if text.startswith("Literal["):
        return " \\| ".join(f"`{choice}`" for choice in json.loads("[" + text[len("Literal[") : -1].replace("'", '"') + "]"))
    return text.replace("<class '", "").replace("'>", "").replace("|", "\\|")


def default_text(field: FieldInfo) -> str:
    """The default as the environment would spell it; "unset" for None."""
    value: Any = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]  # no validated data to pass
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`" if str(value) != "" else "empty"


def bounds_text(field: FieldInfo) -> str:
    """The numeric bounds pydantic checks, e.g. "≥ 1"."""
    bounds = []
    for constraint in field.metadata:
        for kind, (sign, attribute) in BOUND_SIGNS.items():
            if isinstance(constraint, kind):
                bounds.append(f"{sign} {getattr(constraint, attribute)}")
    return ", ".join(bounds)


def settings_reference() -> str:
    """The whole of docs/configuration.md."""
    rows = []
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `SD_{name.upper()}` | {type_name(field)} | {default_text(field)} | {bounds_text(field)} | {description} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
