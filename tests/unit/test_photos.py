"""Training photos: decoded under a pixel cap, turned upright by their EXIF orientation, cropped to a square of the
training's resolution, exact duplicates dropped, and a bad file refused by name."""

import io
import zipfile

import pytest
from PIL import Image

from helpers import png_bytes
from sd_server.errors import InvalidPhotoError
from sd_server.storage.photos import MAX_PHOTOS, Photo, checked_photos, photos_in_archive, prepare_photo


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    """A JPEG, left half red and right half blue, stored ``width`` x ``height`` with an EXIF orientation tag."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_a_photo_is_turned_upright_by_its_exif_orientation_and_cropped_to_the_resolution():
    rotated = Photo("portrait.jpg", jpeg_with_orientation(400, 300, orientation=6))  # stored on its side

    prepared = prepare_photo(rotated, resolution=128, min_side=64)

    assert prepared.size == (128, 128) and prepared.mode == "RGB"
    top, bottom = prepared.getpixel((64, 5)), prepared.getpixel((64, 122))
    assert top[0] > 200 and top[2] < 60  # upright: the red half is on top now
    assert bottom[2] > 200 and bottom[0] < 60


def test_exact_duplicates_are_dropped_and_too_few_distinct_photos_are_refused():
    photos = [Photo(f"{index}.png", png_bytes(seed=index % 2, size=64)) for index in range(4)]

    with pytest.raises(InvalidPhotoError, match="got 2 .*2 exact duplicates dropped"):
        checked_photos(photos, min_side=64)


def test_a_file_that_is_not_an_image_is_refused_naming_it():
    photos = [Photo(f"{index}.png", png_bytes(seed=index, size=64)) for index in range(3)] + [Photo("notes.txt", b"hello")]

    with pytest.raises(InvalidPhotoError, match="notes.txt: not an image"):
        checked_photos(photos, min_side=64)


def test_a_photo_smaller_than_the_minimum_is_refused_naming_it():
    with pytest.raises(InvalidPhotoError, match=r"tiny.png: 32x32 is too small; each photo needs at least 64"):
        prepare_photo(Photo("tiny.png", png_bytes(size=32)), resolution=64, min_side=64)


def test_more_photos_than_the_cap_are_refused():
    photos = [Photo(f"{index}.png", png_bytes(seed=index, size=8)) for index in range(MAX_PHOTOS + 1)]

    with pytest.raises(InvalidPhotoError, match=f"3 to {MAX_PHOTOS} distinct photos"):
        checked_photos(photos, min_side=8)


def test_the_images_in_a_zip_are_read_and_other_files_skipped():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("me/one.png", png_bytes(seed=1, size=64))
        bundle.writestr("me/two.JPG", png_bytes(seed=2, size=64))
        bundle.writestr("me/three.webp", png_bytes(seed=3, size=64))
        bundle.writestr("me/readme.txt", "not a photo")
        bundle.writestr("__MACOSX/me/._one.png", "resource fork")

    photos = photos_in_archive(archive.getvalue(), max_bytes=10_000_000)

    assert [photo.name for photo in photos] == ["me/one.png", "me/two.JPG", "me/three.webp"]


def test_a_zip_that_unpacks_past_the_cap_is_refused():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for index in range(3):
            bundle.writestr(f"big-{index}.png", b"\0" * 400_000)

    with pytest.raises(InvalidPhotoError, match="unpacks to more than 1000000 bytes"):
        photos_in_archive(archive.getvalue(), max_bytes=1_000_000)


def test_something_that_is_not_a_zip_is_refused_as_the_archive():
    with pytest.raises(InvalidPhotoError, match="archive: not a zip file") as refused:
        photos_in_archive(b"PK not really", max_bytes=1000)

    assert refused.value.location == ("body", "archive")
