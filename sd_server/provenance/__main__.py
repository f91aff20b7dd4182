"""``python -m sd_server.provenance verify FILE...``: what POST /provenance/verify says of each file, read here
(credentials trusted under this machine's SD_C2PA_* settings), as one JSON object per file."""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from config import Settings
from sd_server.errors import InvalidPhotoError
from sd_server.provenance.marks import Provenance


def main(argv: list[str] | None = None) -> int:
    """Verify each file; exit 0 when every one says it was generated, 1 when one does not, 2 when one is unreadable."""
    parser = argparse.ArgumentParser(prog="python -m sd_server.provenance", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="read the credentials, metadata and watermark of image files")
    verify.add_argument("files", nargs="+", type=Path)
    arguments = parser.parse_args(argv)
    provenance = Provenance(Settings(), signing=False)
    status = 0
    for path in arguments.files:
        try:
            verification = provenance.verify(path.read_bytes(), path.name)
        except (OSError, InvalidPhotoError) as error:
            print(json.dumps({"file": str(path), "error": getattr(error, "message", str(error))}))
            status = 2
            continue
        print(json.dumps({"file": str(path), "generated": verification.generated, **asdict(verification)}))
        status = max(status, 0 if verification.generated else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
