"""Model files under SD_MODELS_DIR: where a source lies, and LoRA uploads kept under their content hash, so a
stored file never changes."""

import hashlib
import secrets
from pathlib import Path
from typing import BinaryIO

LORA_FOLDER = "loras"


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


def stage_upload(upload: BinaryIO, models_dir: Path) -> tuple[Path, str]:
    """Copy an uploaded file to a temporary name under SD_MODELS_DIR/loras/; returns that path and its SHA-256."""
    folder = models_dir / LORA_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".upload-{secrets.token_hex(8)}.safetensors"
    digest = hashlib.sha256()
    with staged.open("xb") as output:
        while chunk := upload.read(1 << 20):
            digest.update(chunk)
            output.write(chunk)
    return staged, digest.hexdigest()


def keep_upload(staged: Path, sha256: str) -> str:
    """Give a checked upload its final name (an identical file already there is kept as is); returns its source."""
    final = staged.with_name(f"{sha256[:32]}.safetensors")
    if final.exists():
        staged.unlink()
    else:
        staged.rename(final)
    return f"{LORA_FOLDER}/{final.name}"
