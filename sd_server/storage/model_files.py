"""Model files under SD_MODELS_DIR: where a source lies, and LoRA uploads kept under their content hash, so a
stored file never changes."""

import hashlib
import json
import secrets
from pathlib import Path
from typing import BinaryIO

LORA_FOLDER = "loras"
STAGING_FOLDER = ".staging"  # uploads being checked: never a model source, emptied at start


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
        candidates = sorted(file for file in path.glob("*.safetensors") if not file.name.startswith("."))
        preferred = [candidate for candidate in candidates if candidate.name == "pytorch_lora_weights.safetensors"]
        path = (preferred or candidates or [None])[0]
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no LoRA .safetensors file at '{source}' under SD_MODELS_DIR")
    return path


def stage_upload(upload: BinaryIO, models_dir: Path) -> tuple[Path, str]:
    """Copy an uploaded file to a temporary name under SD_MODELS_DIR/.staging/; returns that path and its SHA-256."""
    folder = models_dir / STAGING_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f"upload-{secrets.token_hex(8)}.safetensors"
    digest = hashlib.sha256()
    with staged.open("xb") as output:
        while chunk := upload.read(1 << 20):
            digest.update(chunk)
            output.write(chunk)
    return staged, digest.hexdigest()


def keep_upload(staged: Path, sha256: str, models_dir: Path) -> str:
    """Give a checked upload its final name under SD_MODELS_DIR/loras/ (an identical file already there is kept
    as is); returns its source."""
    final = models_dir / LORA_FOLDER / f"{sha256[:32]}.safetensors"
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        staged.unlink()
    else:
        staged.rename(final)
    return f"{LORA_FOLDER}/{final.name}"


def clean_staging(models_dir: Path) -> int:
    """Remove uploads that a crash left half-checked (and those of older versions, staged in loras/); returns how
    many files."""
    leftovers = [*(models_dir / STAGING_FOLDER).glob("*"), *(models_dir / LORA_FOLDER).glob(".upload-*")]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


TRAINING_DEFAULTS_FILE = "training_defaults.json"


def training_defaults(models_dir: Path, source: str) -> dict[str, object]:
    """The training defaults a local base model carries (``training_defaults.json`` in its folder): the recipe that
    works on it. Empty for a hub id or a folder without one; ValueError when the file is not a JSON object."""
    path = local_path(models_dir, source)
    if path is None or not (path / TRAINING_DEFAULTS_FILE).is_file():
        return {}
    defaults = json.loads((path / TRAINING_DEFAULTS_FILE).read_text())
    if not isinstance(defaults, dict):
        raise ValueError(f"{path / TRAINING_DEFAULTS_FILE} must hold a JSON object of training settings")
    return defaults
