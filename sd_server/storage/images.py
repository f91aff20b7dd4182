"""Image storage behind one interface: a local directory (default) or S3-compatible object storage."""

import contextlib
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from config import Settings
from sd_server.errors import StorageError


def image_name(seed: int) -> str:
    """A new unique, unguessable file name for an image: time, seed, and 128 random bits."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{seed}_{secrets.token_hex(16)}.png"


class ImageStorage(Protocol):
    """Stores PNGs by key (a unique file name) and says where a client fetches them."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def url(self, key: str) -> str: ...

    def local_path(self, key: str) -> Path | None: ...

    def clean_up(self) -> int: ...


class LocalStorage:
    """PNG files in one directory, served by GET /images/{key}."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, data: bytes) -> None:
        """Write the file whole or not at all: to a temporary name, flushed to disk, then renamed (a full disk or a
        crash leaves no truncated PNG under a key; ``clean_up`` removes what it leaves)."""
        partial = self.root / f".{key}.partial"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(partial, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            partial.rename(self.root / key)
        except OSError as error:
            with contextlib.suppress(OSError):  # the folder itself may be what failed
                partial.unlink(missing_ok=True)
            raise StorageError(f"could not write image {key} (SD_OUTPUT_DIR): {error.strerror}", detail=str(error)) from error

    def get(self, key: str) -> bytes:
        """The file's bytes; StorageError when it cannot be read."""
        try:
            return (self.root / key).read_bytes()
        except OSError as error:
            raise StorageError(f"could not read image {key} (SD_OUTPUT_DIR): {error.strerror}", detail=str(error)) from error

    def delete(self, key: str) -> None:
        """Remove the file if it is there."""
        (self.root / key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """True when the file is there."""
        return (self.root / key).is_file()

    def url(self, key: str) -> str:
        """The API route that serves the file."""
        return f"/images/{key}"

    def local_path(self, key: str) -> Path | None:
        """The file on the server."""
        return self.root / key

    def clean_up(self) -> int:
        """Remove what writes cut off by a crash left behind; returns how many files."""
        partials = list(self.root.glob(".*.partial")) if self.root.is_dir() else []
        for partial in partials:
            partial.unlink(missing_ok=True)
        return len(partials)


class S3Storage:
    """Objects in an S3-compatible bucket; clients fetch them through presigned URLs."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str | None, url_expiry_s: int) -> None:
        # boto3 is imported here, not with the module: a deployment without S3 never loads it (a sizeable import).
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket, self.prefix, self.url_expiry_s = bucket, prefix, url_expiry_s
        self._client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=Config(retries={"max_attempts": 3}))
        self._failures: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        self._answered = ClientError  # the store answered with an error (a missing object, say)

    def put(self, key: str, data: bytes) -> None:
        """Upload the PNG."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType="image/png")
        except self._failures as error:
            raise StorageError(f"could not upload {key} to s3://{self.bucket}/{self.prefix} (SD_S3_*): {error}") from error

    def get(self, key: str) -> bytes:
        """The object's bytes."""
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except self._failures as error:
            raise StorageError(f"could not read {key} from s3://{self.bucket}/{self.prefix} (SD_S3_*): {error}") from error

    def delete(self, key: str) -> None:
        """Delete the object (no error if it is gone)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except self._failures as error:
            raise StorageError(f"could not delete {key} from s3://{self.bucket} (SD_S3_*): {error}") from error

    def exists(self, key: str) -> bool:
        """True when the object is there."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True
        except self._answered:
            return False

    def url(self, key: str) -> str:
        """A presigned GET URL, valid SD_S3_URL_EXPIRY_S seconds."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key}, ExpiresIn=self.url_expiry_s
        )

    def local_path(self, key: str) -> Path | None:
        """Objects have no path on the server."""
        return None

    def clean_up(self) -> int:
        """Nothing to clean: an upload is whole or absent."""
        return 0


def create_storage(settings: Settings) -> ImageStorage:
    """The storage SD_STORAGE names."""
    if settings.storage == "local":
        return LocalStorage(settings.output_dir)
    if not settings.s3_bucket:
        raise ValueError("SD_STORAGE=s3 needs SD_S3_BUCKET")
    return S3Storage(
        settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region, settings.s3_url_expiry_s
    )
