"""LoRA uploads: staged under SD_MODELS_DIR/loras/, then kept under their content hash, so a stored file never changes."""

import hashlib
import re
import secrets
from pathlib import Path
from typing import BinaryIO

LORA_FOLDER = "loras"
UPLOAD_PATHS = re.compile(r"/users/[^/]+/lora")  # routes whose bodies may reach SD_MAX_UPLOAD_BYTES


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
