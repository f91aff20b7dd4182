"""A user's training photos: decoded with Pillow under a pixel cap, turned upright by their EXIF orientation, made
RGB, centre-cropped to a square and resized to the training's resolution; exact duplicates dropped. A file that
is not an image, is too small or too large is refused with its name, and nothing is kept."""

import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sd_server.errors import InvalidPhotoError

MIN_PHOTOS, MAX_PHOTOS = 3, 50
MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB; larger ones are refused before decoding
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Photo:
    """One uploaded file: its name (for error messages) and its bytes."""

    name: str
    data: bytes


def prepare_photo(photo: Photo, resolution: int, min_side: int) -> Image.Image:
    """The photo upright, RGB, centre-cropped to a square of ``resolution`` pixels; InvalidPhotoError naming the file
    when it is not an image, has fewer than ``min_side`` pixels on a side, or more than MAX_PIXELS."""
    upright = open_upright(photo.name, photo.data)
    if min(upright.size) < min_side:
        width, height = upright.size
        raise InvalidPhotoError(f"{photo.name}: {width}x{height} is too small; each photo needs at least {min_side} pixels a side")
    return ImageOps.fit(upright, (resolution, resolution), Image.Resampling.LANCZOS)


def open_upright(name: str, data: bytes, field: str = "images") -> Image.Image:
    """The image in ``data`` decoded, turned upright by its EXIF orientation, RGB; InvalidPhotoError naming it (at
    ``field``) when it is not an image Pillow reads, or has more than MAX_PIXELS (refused before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InvalidPhotoError(f"{name}: {width}x{height} is over {MAX_PIXELS // 1_000_000} megapixels", field=field)
                return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise InvalidPhotoError(f"{name}: not an image Pillow can read ({type(error).__name__})", field=field) from error


def prepare_photos(photos: list[Photo], resolution: int, min_side: int) -> list[Image.Image]:
    """Every photo prepared, exact duplicates (same bytes) dropped; InvalidPhotoError when fewer than MIN_PHOTOS or
    more than MAX_PHOTOS distinct ones remain."""
    distinct = list({hashlib.sha256(photo.data).hexdigest(): photo for photo in photos}.values())
    if not MIN_PHOTOS <= len(distinct) <= MAX_PHOTOS:
        dropped = len(photos) - len(distinct)
        note = f" ({dropped} exact duplicates dropped)" if dropped else ""
        raise InvalidPhotoError(f"a training needs {MIN_PHOTOS} to {MAX_PHOTOS} distinct photos; got {len(distinct)}{note}")
    return [prepare_photo(photo, resolution, min_side) for photo in distinct]


def photos_in_archive(data: bytes, max_bytes: int) -> list[Photo]:
    """The image files inside a zip archive (folders and other files skipped), up to ``max_bytes`` uncompressed in
    all; InvalidPhotoError when it is not a zip or would unpack past the cap."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise InvalidPhotoError("archive: not a zip file", field="archive") from error
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir() and info.filename.lower().endswith(IMAGE_SUFFIXES)]
        members = [info for info in members if not Path(info.filename).name.startswith(".")]  # macOS "._" forks
        if sum(info.file_size for info in members) > max_bytes:
            raise InvalidPhotoError(f"archive: unpacks to more than {max_bytes} bytes (SD_MAX_UPLOAD_BYTES)", field="archive")
        return [Photo(info.filename, read_member(archive, info, max_bytes)) for info in members]


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """One member's bytes, refusing one that unpacks past what its header declared (a forged size)."""
    with archive.open(info) as member:
        data = member.read(min(info.file_size, max_bytes) + 1)
    if len(data) > info.file_size:
        raise InvalidPhotoError(f"{info.filename}: unpacks past its declared size", field="archive")
    return data


def save_photos(images: list[Image.Image], folder: Path) -> list[Path]:
    """Write the prepared photos as PNGs into ``folder`` (created); their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:02d}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


def photo_paths(folder: Path) -> list[Path]:
    """The prepared photos of a training, in order."""
    return sorted(folder.glob("*.png"))
