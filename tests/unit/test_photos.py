"""Training photos: decoded under a pixel cap, turned upright by their EXIF orientation, cropped to a square of the
training's resolution (around the face for a person), exact and near duplicates dropped, a bad file refused by name,
photos of a person with no face or several refused, tiny and blurry faces warned about."""

import io
import zipfile

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFilter, ImageOps

from helpers import png_bytes
from sd_server.domain.trainings import TrainingSettings
from sd_server.errors import InvalidPhotoError
from sd_server.storage.faces import find_faces
from sd_server.storage.photos import (
    MAX_PHOTOS,
    Photo,
    PreparedPhoto,
    checked_photos,
    photos_in_archive,
    prepare_photo,
    review_photos,
)


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

    assert prepared.image.size == (128, 128) and prepared.image.mode == "RGB"
    top, bottom = prepared.image.getpixel((64, 5)), prepared.image.getpixel((64, 122))
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


# Real photographs: scikit-image's astronaut (Eileen Collins, one face) and coffee (no face).
def photo_of(image: Image.Image, name: str, quality: int | None = None) -> Photo:
    """``image`` as an uploaded file: PNG, or JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if quality else "PNG", **({"quality": quality} if quality else {}))
    return Photo(name, buffer.getvalue())


def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def on_canvas(image: Image.Image, size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """``image`` pasted at ``at`` on a grey canvas of ``size``."""
    canvas = Image.new("RGB", size, (128, 128, 128))
    canvas.paste(image, at)
    return canvas


def prepared_people(*photos: Photo) -> list[PreparedPhoto]:
    return [prepare_photo(photo, resolution=256, min_side=64, look_for_faces=True) for photo in photos]


def test_a_persons_photo_is_cropped_around_the_face_where_a_centre_crop_would_cut_it_off():
    wide = on_canvas(astronaut(), (1600, 512), (1088, 0))  # the face near the right edge of a wide photo

    prepared = prepare_photo(photo_of(wide, "wide.png"), resolution=256, min_side=64, look_for_faces=True)

    assert len(find_faces(prepared.image)) == 1
    assert find_faces(ImageOps.fit(wide, (256, 256))) == []  # what the centre crop kept: no face


def test_photos_with_no_face_or_several_faces_are_refused_listing_each_of_them():
    pair = Image.fromarray(np.concatenate([skimage.data.astronaut(), skimage.data.astronaut()[:, ::-1]], axis=1))
    photos = prepared_people(
        photo_of(astronaut(), "me.png"),
        photo_of(Image.fromarray(skimage.data.coffee()), "coffee.png"),
        photo_of(pair, "with-a-friend.png"),
        photo_of(Image.fromarray(skimage.data.chelsea()), "cat.png"),
    )

    with pytest.raises(InvalidPhotoError, match=r"no face found in coffee.png, cat.png; several faces in with-a-friend.png \(2\)") as refused:
        review_photos(photos, require_one_face=True)
    assert refused.value.location == ("body", "images") and "face_check=false" in refused.value.message

    kept, warnings = review_photos(photos, require_one_face=False)  # face_check=false: trained on as they are
    assert [photo.name for photo in kept] == ["me.png", "coffee.png", "with-a-friend.png", "cat.png"] and warnings == []


def test_near_duplicates_are_left_out_and_tiny_or_blurry_faces_are_warned_about():
    photo = astronaut()
    photos = prepared_people(
        photo_of(photo, "me.png"),
        photo_of(photo, "me-again.jpg", quality=75),  # the same shot, re-encoded
        photo_of(photo.resize((384, 384)), "me-smaller.png"),
        photo_of(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).filter(ImageFilter.GaussianBlur(2)), "shaky.png"),
        photo_of(on_canvas(photo.resize((240, 240)), (640, 640), (200, 200)), "far-away.png"),
    )

    kept, warnings = review_photos(photos, require_one_face=True)

    assert [photo.name for photo in kept] == ["me.png", "shaky.png", "far-away.png"]
    assert warnings[:2] == ["me-again.jpg: a near-duplicate of me.png, left out", "me-smaller.png: a near-duplicate of me.png, left out"]
    assert any(warning.startswith("shaky.png: the face looks blurry") for warning in warnings)
    assert any(warning.startswith("far-away.png: the face is 4") and "at least 64" in warning for warning in warnings)
    assert not any(warning.startswith("me.png") for warning in warnings)


def test_too_few_photos_left_after_near_duplicates_are_refused_saying_so():
    photos = prepared_people(*(photo_of(astronaut(), f"{index}.jpg", quality=quality) for index, quality in enumerate((95, 85, 75))))

    with pytest.raises(InvalidPhotoError, match=r"3 to 50 distinct photos; 1 left after near-duplicates: 1.jpg: a near-duplicate of 0.jpg"):
        review_photos(photos, require_one_face=True)


@pytest.mark.parametrize(
    ("class_word", "face_check", "requires", "looks"),
    [("woman", None, True, True), ("Person", None, True, True), ("dog", None, False, False), ("man", False, False, True), ("dog", True, True, True)],
)
def test_one_face_is_required_for_a_person_unless_turned_off_and_looked_for_when_asked(class_word, face_check, requires, looks):
    settings = TrainingSettings(class_word=class_word, face_check=face_check)

    assert (settings.requires_faces, settings.looks_for_faces) == (requires, looks)
