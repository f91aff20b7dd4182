"""The docs describe what exists: the configuration reference is the Settings class itself, every setting says what
it does, and every link between the docs lands on a file and a heading that exist."""

import re
from pathlib import Path

import pytest

from config import Settings
from helpers import PROJECT_DIR
from sd_server.settings_reference import settings_reference

DOCS = [PROJECT_DIR / "README.md", PROJECT_DIR / "QUICKSTART.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (outside code blocks)."""
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_the_configuration_reference_is_generated_from_the_settings_class():
    assert (PROJECT_DIR / "docs" / "configuration.md").read_text() == settings_reference(), (
        "docs/configuration.md drifted from config.py: run python -m sd_server.settings_reference > docs/configuration.md"
    )


def test_every_setting_says_what_it_does():
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


@pytest.mark.parametrize("document", DOCS, ids=lambda path: path.name)
def test_every_relative_link_lands_on_a_file_and_heading_that_exist(document: Path):
    broken = []
    for target in LINK.findall(document.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_readme_is_a_short_front_page():
    assert len((PROJECT_DIR / "README.md").read_text().splitlines()) < 300
