"""Property tests (Hypothesis, a fixed budget of examples, the same examples on every run): every decoder and parser
of client input the service owns either accepts its input or refuses it with the error that becomes a 4xx, whatever
the input; and what it accepts stays within the bounds the README states."""

import base64
import io
import zipfile
from collections.abc import Callable

import hypothesis
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import strategies as st
from PIL import Image

from hostile import CORRUPT_IMAGES, photo_zip
from sd_server.api.routes.jobs import decode_cursor
from sd_server.domain.prompt_weights import MAX_WEIGHT, MIN_WEIGHT, check_weights, parse_attention
from sd_server.domain.styles import PromptTooLongError, merge_prompt
from sd_server.domain.trainings import MAX_CAPTION_CHARS, check_caption_template, fill_template
from sd_server.errors import InvalidPhotoError
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.security.sessions import Sessions, same_secret
from sd_server.storage.photos import Photo, photos_in_archive, prepare_photo
from sd_server.storage.source_images import decode_base64, prepare_sources

BUDGET = hypothesis.settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))


def encoded(image: Image.Image, format: str, **options) -> bytes:
    """``image`` in ``format``."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


PICTURE = Image.new("RGB", (24, 16), (200, 40, 10))
VALID_IMAGES = [encoded(PICTURE, format) for format in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")]
ROTATED = Image.Exif()
ROTATED[0x0112] = 6  # EXIF orientation: stored on its side
VALID_IMAGES += [encoded(PICTURE, "JPEG", exif=ROTATED), *(make() for make in CORRUPT_IMAGES.values())]


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``seeds`` with a few bytes overwritten, a slice cut out, or cut short."""

    @st.composite
    def mutate(draw: Callable) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            start = draw(st.integers(0, len(data)))
            del data[start : start + draw(st.integers(0, 64))]
        return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)

    return mutate()


IMAGE_BYTES = st.binary(max_size=512) | mutated(VALID_IMAGES)


@BUDGET
@hypothesis.given(data=IMAGE_BYTES)
def test_a_photo_is_prepared_or_refused_as_invalid_whatever_its_bytes(data):
    try:
        prepared = prepare_photo(Photo("photo", data), resolution=64, min_side=8, look_for_faces=True)
    except InvalidPhotoError:
        return
    assert prepared.image.size == (64, 64) and prepared.image.mode == "RGB"


@BUDGET
@hypothesis.given(init=IMAGE_BYTES, mask=st.none() | IMAGE_BYTES)
def test_an_init_image_and_mask_are_prepared_or_refused_as_invalid_whatever_their_bytes(init, mask):
    try:
        sources = prepare_sources(init, mask, None)
    except InvalidPhotoError as error:
        assert error.location[-1] in ("init_image", "mask_image")
        return
    assert 256 <= sources.width <= 1024 and 256 <= sources.height <= 1024


ZIPS = [photo_zip(), photo_zip(4)]


@BUDGET
@hypothesis.given(data=st.binary(max_size=256) | mutated(ZIPS))
def test_a_zip_of_photos_is_unpacked_or_refused_as_invalid_whatever_its_bytes(data):
    try:
        photos = photos_in_archive(data, max_bytes=1_000_000)
    except InvalidPhotoError as error:
        assert error.location == ("body", "archive")
        return
    assert 3 <= len(photos) and sum(len(photo.data) for photo in photos) <= 1_000_000


@BUDGET
@hypothesis.given(value=st.text() | st.text().map(lambda text: "data:" + text) | st.binary(max_size=64).map(lambda data: base64.b64encode(data).decode()))
def test_a_base64_image_field_is_decoded_or_refused_as_invalid_whatever_its_text(value):
    try:
        data = decode_base64("init_image", value)
    except InvalidPhotoError as error:
        assert error.location == ("body", "init_image")
        return
    assert data


CURSOR_TEXT = st.text() | st.tuples(st.text(), st.text()).map(lambda parts: "|".join(parts)) | st.datetimes(
    timezones=st.timezones()
).map(lambda moment: f"{moment.isoformat()}|{'0' * 32}")


@BUDGET
@hypothesis.given(text=CURSOR_TEXT, raw=st.booleans())
def test_a_cursor_is_decoded_or_refused_with_422_whatever_its_text(text, raw):
    cursor = text if raw else base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode()
    try:
        created, job_id = decode_cursor(cursor)
    except RequestValidationError as error:
        assert error.errors()[0]["loc"] == ("query", "cursor")
        return
    assert created.utcoffset().total_seconds() == 0 and len(job_id) == 32


PROMPT_TEXT = st.text(alphabet=st.sampled_from("()[]:\\ ab1.9-+"), max_size=80) | st.text(max_size=80)


@BUDGET
@hypothesis.given(text=PROMPT_TEXT)
def test_prompt_weights_are_accepted_within_range_or_refused(text):
    segments = parse_attention(text)
    try:
        check_weights(text)
    except ValueError:
        return
    assert all(MIN_WEIGHT <= weight <= MAX_WEIGHT for segment, weight in segments if segment.strip())


@BUDGET
@hypothesis.given(template=st.text(alphabet=st.sampled_from("{}:.!x> 0123triggerclass_word"), max_size=240) | st.text(max_size=240))
def test_a_caption_template_is_filled_by_substitution_within_its_bound_or_refused(template):
    try:
        check_caption_template(template)
    except ValueError:
        return
    caption = fill_template(template, "t" * 32, "c" * 32)
    assert len(caption) <= MAX_CAPTION_CHARS + template.count("{") * 32 and "{" not in caption


@BUDGET
@hypothesis.given(style=st.text(alphabet=st.sampled_from("{prompt}, x"), max_size=200), prompt=st.text(max_size=300))
def test_a_style_applies_within_the_cap_or_is_refused_before_its_text_is_built(style, prompt):
    try:
        merged = merge_prompt(style, prompt, max_chars=400)
    except PromptTooLongError:
        return
    assert len(merged) <= 400


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> Sessions:
    """Sessions on a migrated SQLite database, one session issued."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sessions') / 'sd-api.db'}"
    migrate(url)
    store = Sessions("secret", 60, create_database_engine(url))
    store.issue("key-1")
    return store


@BUDGET
@hypothesis.given(cookie=st.text() | st.text(alphabet=st.sampled_from("0123456789abcdef.-_=")))
def test_a_session_cookie_is_verified_or_refused_whatever_its_text(sessions, cookie):
    assert sessions.verify(cookie) is None
    assert same_secret(cookie, "expected-token") is (cookie == "expected-token")


def test_the_fuzzed_zips_start_from_archives_that_unpack():
    assert all(len(photos_in_archive(data, max_bytes=1_000_000)) >= 3 for data in ZIPS)
    assert all(zipfile.is_zipfile(io.BytesIO(data)) for data in ZIPS)
