"""Uploaded pictures: training photos and the images img2img starts from. Every file is checked from its header first
(an accepted format, at most MAX_PIXELS) and only then decoded with Pillow, turned upright by its EXIF orientation,
made RGB; a training photo is cropped to a square of the training's resolution (around the face for a person, else
at the centre), exact duplicates dropped before decoding and near-duplicates after. A
zip of photos is unpacked member by member, counting the inflated bytes as they stream. Whatever is wrong with a
file (not an image, corrupt, too small or too large, a broken zip) is refused with its name, and nothing is kept."""

import hashlib
import io
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sd_server.errors import InvalidPhotoError
from sd_server.storage.faces import (
    BLURRY_FACE,
    TINY_FACE_PIXELS,
    Face,
    difference_hash,
    face_sharpness,
    find_faces,
    near_duplicates,
    square_around,
)

MIN_PHOTOS, MAX_PHOTOS = 3, 50
MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB; larger ones are refused before decoding
MAX_PHOTO_BYTES = 50 * 1024**2  # one photo's file, sent or unzipped (a phone's photos are a few MB)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG opens phone cameras' MPO files too
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
INFLATE_CHUNK = 1 << 20  # a zip member is read this much at a time


@dataclass(frozen=True)
class Photo:
    """One uploaded file: its name (for error messages) and its bytes."""

    name: str
    data: bytes


def image_size(name: str, data: bytes, field: str = "images") -> tuple[int, int]:
    """Width and height from the file's header, nothing decoded; InvalidPhotoError naming the file (at ``field``)
    when it is not in an accepted format or has more than MAX_PIXELS."""
    with opened(name, data, field) as image:
        return image.size


def open_upright(
    name: str, data: bytes, field: str = "images", fits: tuple[int, int] | None = None, min_side: int = 0
) -> Image.Image:
    """The image in ``data`` decoded, turned upright by its EXIF orientation, RGB; InvalidPhotoError naming it (at
    ``field``) when it is not an image in an accepted format, is corrupt, or its header shows more than MAX_PIXELS or
    fewer than ``min_side`` pixels a side (refused before decoding). With ``fits``, a JPEG may be decoded at a
    reduced scale that still covers that size (much faster)."""
    with opened(name, data, field, min_side) as image:
        try:
            if fits is not None:
                image.draft("RGB", fits)
            return ImageOps.exif_transpose(image).convert("RGB")
        except Exception as error:  # a decoder meets a corrupt file in many ways (OSError, SyntaxError, struct.error...)
            raise InvalidPhotoError(f"{name}: a corrupt image Pillow cannot decode ({type(error).__name__})", field=field) from error


@contextmanager
def opened(name: str, data: bytes, field: str, min_side: int = 0) -> Iterator[Image.Image]:
    """The image in ``data`` opened lazily (its header read, no pixel decoded) and checked: an accepted format, at
    most MAX_PIXELS, at least ``min_side`` pixels a side; closed on leaving."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Exception as error:  # not an image, or a header Pillow's parsers refuse in any of their ways
        raise InvalidPhotoError(
            f"{name}: not an image Pillow can read ({type(error).__name__}); send JPEG, PNG, WebP, BMP, GIF or TIFF", field=field
        ) from error
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InvalidPhotoError(f"{name}: {width}x{height} is over {MAX_PIXELS // 1_000_000} megapixels", field=field)
        if min(width, height) < min_side:
            raise InvalidPhotoError(f"{name}: {width}x{height} is too small; each photo needs at least {min_side} pixels a side", field=field)
        yield image


def check_photo(photo: Photo, min_side: int) -> None:
    """InvalidPhotoError naming the photo when its header shows it cannot be used: not an accepted image, more than
    MAX_PIXELS, or fewer than ``min_side`` pixels on a side. Nothing is decoded."""
    with opened(photo.name, photo.data, "images", min_side):
        pass


@dataclass(frozen=True)
class PreparedPhoto:
    """A training photo decoded and cropped to its square, with what was seen in it on the way."""

    name: str
    image: Image.Image
    faces: list[Face] | None  # None: not looked for
    face_sharpness: float | None
    hash: np.ndarray


def prepare_photo(photo: Photo, resolution: int, min_side: int, look_for_faces: bool = False) -> PreparedPhoto:
    """The photo upright, RGB, cropped to a square of ``resolution`` pixels: around its largest face when faces are
    looked for and one is found, else at its centre; InvalidPhotoError naming the file when it is not an image, has
    fewer than ``min_side`` pixels on a side, or more than MAX_PIXELS."""
    upright = open_upright(photo.name, photo.data, fits=(resolution, resolution), min_side=min_side)
    faces = find_faces(upright) if look_for_faces else None
    if faces:
        square = upright.crop(square_around(upright, faces[0], resolution)).resize((resolution, resolution), Image.Resampling.LANCZOS)
    else:
        square = ImageOps.fit(upright, (resolution, resolution), Image.Resampling.LANCZOS)
    sharpness = face_sharpness(upright, faces[0]) if faces else None
    return PreparedPhoto(photo.name, square, faces, sharpness, difference_hash(upright))


def review_photos(photos: list[PreparedPhoto], require_one_face: bool) -> tuple[list[PreparedPhoto], list[str]]:
    """The photos to train on (near-duplicates of an earlier one left out) and warnings for the training's record
    (left-out photos, tiny or blurry faces); InvalidPhotoError listing the photos with no face or several faces
    when one face each is required, or when fewer than MIN_PHOTOS remain."""
    kept: list[PreparedPhoto] = []
    warnings: list[str] = []
    for photo in photos:
        twin = next((earlier for earlier in kept if near_duplicates(earlier.hash, photo.hash)), None)
        if twin is None:
            kept.append(photo)
        else:
            warnings.append(f"{photo.name}: a near-duplicate of {twin.name}, left out")
    if require_one_face:
        check_one_face_each(kept)
    for photo in kept:
        warnings += face_warnings(photo)
    if len(kept) < MIN_PHOTOS:
        raise InvalidPhotoError(f"a training needs {MIN_PHOTOS} to {MAX_PHOTOS} distinct photos; {len(kept)} left after near-duplicates: {'; '.join(warnings)}")
    return kept, warnings


def check_one_face_each(photos: list[PreparedPhoto]) -> None:
    """InvalidPhotoError listing every photo without a face and every one with several."""
    faceless = [photo.name for photo in photos if not photo.faces]
    crowded = [f"{photo.name} ({len(photo.faces)})" for photo in photos if photo.faces and len(photo.faces) > 1]
    problems = ([f"no face found in {', '.join(faceless)}"] if faceless else []) + ([f"several faces in {', '.join(crowded)}"] if crowded else [])
    if problems:
        raise InvalidPhotoError(
            f"{'; '.join(problems)}. Send photos of the subject alone, face visible; face_check=false trains on them as they are",
            field="images",
        )


def face_warnings(photo: PreparedPhoto) -> list[str]:
    """What may make a photo teach less: a face too small to carry detail, or out of focus."""
    if not photo.faces:
        return []
    warnings = []
    if photo.faces[0].side < TINY_FACE_PIXELS:
        warnings.append(f"{photo.name}: the face is {photo.faces[0].side} pixels wide; at least {TINY_FACE_PIXELS} carry its details")
    if photo.face_sharpness is not None and photo.face_sharpness < BLURRY_FACE:
        warnings.append(f"{photo.name}: the face looks blurry (sharpness {photo.face_sharpness:.0f}, sharp faces score over {BLURRY_FACE:.0f})")
    return warnings


def checked_photos(photos: list[Photo], min_side: int) -> list[Photo]:
    """The distinct photos (exact duplicates, the same bytes, dropped), every one checked from its header, nothing
    decoded; InvalidPhotoError when fewer than MIN_PHOTOS or more than MAX_PHOTOS remain, or naming one that cannot
    be used (``check_photo``)."""
    distinct = list({hashlib.sha256(photo.data).hexdigest(): photo for photo in photos}.values())
    if not MIN_PHOTOS <= len(distinct) <= MAX_PHOTOS:
        dropped = len(photos) - len(distinct)
        note = f" ({dropped} exact duplicates dropped)" if dropped else ""
        raise InvalidPhotoError(f"a training needs {MIN_PHOTOS} to {MAX_PHOTOS} distinct photos; got {len(distinct)}{note}")
    for photo in distinct:
        check_photo(photo, min_side)
    return distinct


def photos_in_archive(data: bytes, max_bytes: int) -> list[Photo]:
    """The image files inside a zip archive (folders and other files skipped): at most MAX_PHOTOS of them, each at
    most MAX_PHOTO_BYTES, ``max_bytes`` in all, by their declared sizes and again as they inflate; InvalidPhotoError
    when it is not a zip, is corrupt, or would unpack past a cap."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [info for info in archive.infolist() if not info.is_dir() and info.filename.lower().endswith(IMAGE_SUFFIXES)]
    except Exception as error:  # BadZipFile, and whatever else a forged directory makes zipfile raise
        raise InvalidPhotoError(f"archive: not a zip file ({type(error).__name__})", field="archive") from error
    with archive:
        members = [info for info in members if not Path(info.filename).name.startswith(".")]  # macOS "._" forks
        if not MIN_PHOTOS <= len(members) <= MAX_PHOTOS:
            raise InvalidPhotoError(f"archive: {len(members)} photos; a training needs {MIN_PHOTOS} to {MAX_PHOTOS}", field="archive")
        if sum(info.file_size for info in members) > max_bytes:
            raise InvalidPhotoError(f"archive: unpacks to more than {max_bytes} bytes (SD_MAX_TRAINING_UPLOAD_BYTES)", field="archive")
        photos: list[Photo] = []
        budget = max_bytes
        for info in members:
            photos.append(Photo(info.filename, read_member(archive, info, min(budget, MAX_PHOTO_BYTES))))
            budget -= len(photos[-1].data)
        return photos


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """One member's bytes, inflated a chunk at a time: refused as soon as its first bytes are no image's or it passes
    ``limit`` (whatever its header declared), or when it cannot be unpacked (a bad CRC, a corrupt stream, encryption,
    an unsupported compression method)."""
    chunks: list[bytes] = []
    inflated = 0
    try:
        with archive.open(info) as member:
            while chunk := member.read(INFLATE_CHUNK):
                if not chunks and not looks_like_an_image(chunk):
                    raise InvalidPhotoError(f"{info.filename}: not an image (JPEG, PNG, WebP, BMP, GIF or TIFF)", field="archive")
                inflated += len(chunk)
                if inflated > limit:
                    raise InvalidPhotoError(f"{info.filename}: unpacks past {limit} bytes", field="archive")
                chunks.append(chunk)
    except InvalidPhotoError:
        raise
    except Exception as error:  # BadZipFile (CRC), zlib.error, RuntimeError (encrypted), NotImplementedError (method)...
        raise InvalidPhotoError(f"{info.filename}: cannot be unpacked ({type(error).__name__})", field="archive") from error
    return b"".join(chunks)


def looks_like_an_image(head: bytes) -> bool:
    """True when ``head`` starts the way a file of an accepted format does."""
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


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
