"""Hostile input on the surfaces of trainings, uploads, sessions, templates, styles and prompt weights: each is
refused with a 4xx naming its field before it costs anything, never a 500, never a stall, never a black image."""

import base64
import io
import tracemalloc

import pytest
from fastapi.testclient import TestClient

from helpers import png_bytes
from hostile import CORRUPT_IMAGES, CORRUPT_ZIPS, photo_zip, zip_bomb
from sd_server.errors import InvalidPhotoError
from sd_server.security.sessions import CSRF_HEADER, SESSION_COOKIE
from sd_server.storage.photos import MAX_PHOTO_BYTES, photos_in_archive

ADMIN_KEY = "admin-key-for-the-hostile-tests-012345"
TRAINING_FIELDS = {"steps": "5", "resolution": "64", "class_word": "shape"}


@pytest.fixture
def small_photos(settings):
    """Training photos of 64 pixels a side are accepted."""
    settings.training_min_photo_side = 64
    return settings


def train(client: TestClient, files: list | None = None, **fields: str):
    """POST a training for alice (three good photos unless ``files`` says otherwise); the answer."""
    photos = files if files is not None else [("images", (f"{index}.png", png_bytes(index, 64), "image/png")) for index in range(3)]
    return client.post("/users/alice/trainings", files=photos, data={**TRAINING_FIELDS, **fields})


def field_of(response) -> list:
    """Where a 422 says the problem is."""
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"]


# --- caption templates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption",
    [
        "{trigger} {class_word:x>10000000}",  # a format spec that grows it to 10 MB
        "{trigger}{class_word.foo}",  # an attribute
        "{trigger}{trigger:{class_word}}",  # a nested field that failed only on the device
        "{trigger} {0}",
        "{trigger} {{class_word}}",
        "{trigger} {name}",
        "{trigger} " + "a" * 200,
    ],
)
def test_a_caption_template_that_is_not_plain_substitution_is_refused_at_submission(client, small_photos, caption):
    response = train(client, caption=caption)

    assert field_of(response) == ["body", "caption"]
    assert client.get("/trainings").json()["total"] == 0


def test_a_caption_template_is_filled_by_plain_substitution():
    from sd_server.domain.trainings import TrainingSettings

    settings = TrainingSettings(trigger="zwx", class_word="dog", caption="{trigger} {class_word}, {trigger} again")

    assert settings.caption_text == "zwx dog, zwx again"


# --- uploads --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", CORRUPT_ZIPS)
def test_a_corrupt_zip_of_photos_is_refused_with_422_naming_the_archive(client, small_photos, damage):
    response = train(client, files=[("archive", ("photos.zip", CORRUPT_ZIPS[damage](), "application/zip"))])

    assert field_of(response) == ["body", "archive"]


def test_a_good_zip_of_photos_is_accepted(client, small_photos):
    assert train(client, files=[("archive", ("photos.zip", photo_zip(), "application/zip"))]).status_code == 202


@pytest.mark.parametrize("damage", CORRUPT_IMAGES)
def test_a_corrupt_training_photo_is_refused_with_422_naming_it(client, small_photos, damage):
    files = [("images", (f"{index}.png", png_bytes(index, 64), "image/png")) for index in range(3)]
    files.append(("images", ("broken.png", CORRUPT_IMAGES[damage](), "image/png")))

    response = train(client, files=files)

    assert field_of(response) == ["body", "images"] and "broken.png" in response.json()["detail"][0]["msg"]


def base64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("damage", CORRUPT_IMAGES)
@pytest.mark.parametrize("field", ["init_image", "mask_image"])
def test_a_corrupt_init_image_or_mask_is_refused_with_422_naming_it(client, small_request, damage, field):
    body = small_request(**{"init_image": base64_of(png_bytes(1, 64)), field: base64_of(CORRUPT_IMAGES[damage]())})

    assert field_of(client.post("/jobs", json=body)) == ["body", field]


@pytest.mark.parametrize("damage", CORRUPT_IMAGES)
def test_a_corrupt_multipart_image_or_a1111_init_image_is_refused_with_422(client, damage):
    data = CORRUPT_IMAGES[damage]()
    multipart = client.post("/generate/image", data={"prompt": "a cat"}, files={"init_image": ("x.png", data, "image/png")})
    a1111 = client.post("/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": [base64_of(data)], "steps": 2})

    assert field_of(multipart) == ["body", "init_image"]
    assert field_of(a1111) == ["body", "init_images"]


@pytest.mark.parametrize("value", ["data:image/png;base64", "data:", "data:image/png;base64,"])
def test_a_data_url_without_its_comma_or_payload_is_refused_with_422(client, small_request, value):
    assert field_of(client.post("/jobs", json=small_request(init_image=value))) == ["body", "init_image"]
    assert field_of(client.post("/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": [value]})) == ["body", "init_images"]


def held_while(refuse) -> int:
    """The most memory Python held (bytes) while ``refuse()`` ran."""
    tracemalloc.start()
    try:
        refuse()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_is_refused_from_its_declared_sizes_without_inflating_it():
    bomb = zip_bomb(100_000_000, members=4)  # 400 MB of zeros in about 400 KB

    def refuse():
        with pytest.raises(InvalidPhotoError, match="archive: unpacks to more than"):
            photos_in_archive(bomb, max_bytes=200 * 1024**2)

    assert held_while(refuse) < 4 * 1024**2


def test_a_zip_bomb_within_the_declared_caps_is_refused_at_its_first_chunk():
    bomb = zip_bomb(MAX_PHOTO_BYTES, members=3)

    def refuse():
        with pytest.raises(InvalidPhotoError, match="photo-0.png: not an image"):
            photos_in_archive(bomb, max_bytes=200 * 1024**2)

    assert held_while(refuse) < 8 * 1024**2


def test_a_zip_bomb_dressed_as_pngs_holds_no_more_than_it_declares_and_is_refused(client, small_photos):
    inflated = 20 * 1024**2
    bomb = zip_bomb(inflated, head=b"\x89PNG\r\n\x1a\n", members=3)

    held = held_while(lambda: photos_in_archive(bomb, max_bytes=200 * 1024**2))
    response = train(client, files=[("archive", ("photos.zip", bomb, "application/zip"))])

    assert held < 4 * inflated + 8 * 1024**2, f"{held / 1024**2:.0f} MiB held for {3 * inflated / 1024**2:.0f} MiB declared"
    assert field_of(response) == ["body", "images"]  # unpacked within the caps, then refused


def test_a_photo_over_the_pixel_cap_is_refused_from_its_header_before_decoding(client, small_photos):
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("1", (7000, 6000)).save(buffer, format="PNG")  # 42 megapixels in a few kilobytes
    files = [("images", (f"{index}.png", png_bytes(index, 64), "image/png")) for index in range(3)]
    files.append(("images", ("huge.png", buffer.getvalue(), "image/png")))

    response = train(client, files=files)

    assert field_of(response) == ["body", "images"] and "huge.png: 7000x6000 is over 40 megapixels" in response.json()["detail"][0]["msg"]


# --- styles and prompt weights --------------------------------------------------------------------------------


def test_styles_cannot_grow_a_prompt_past_the_prompt_cap(client, small_request):
    client.put("/styles/triple", json={"prompt": "{prompt} {prompt} {prompt}"})

    response = client.post("/jobs", json=small_request(prompt="a" * 300, styles=["triple"] * 6))
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a" * 300, "styles": ["triple"] * 6, "steps": 2})

    assert field_of(response) == ["body", "styles"] and "at most 2000" in response.json()["detail"][0]["msg"]
    assert field_of(a1111) == ["body", "styles"]


def test_a_style_file_with_thousands_of_placeholders_is_refused_before_the_prompt_is_built(settings, app_factory, small_request, tmp_path):
    settings.styles_file = tmp_path / "styles.csv"
    settings.styles_file.write_text('name,prompt,negative_prompt\nbomb,"' + "{prompt}" * 5000 + '",\n')
    with TestClient(app_factory(settings)) as client:
        response = client.post("/jobs", json=small_request(prompt="a" * 2000, styles=["bomb"] * 10))

    assert field_of(response) == ["body", "styles"] and "10000000 characters" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"prompt": "(a red circle:" + "9" * 40 + ")"}, "prompt", "weights run from 0 to 3"),
        ({"prompt": "(" * 990 + "a red circle" + ")" * 990}, "prompt", "nest more than 12 deep"),
        ({"prompt": "[" * 990 + "a red circle" + "]" * 990}, "prompt", "nest more than 12 deep"),
        ({"prompt": "(a red circle:-2)"}, "prompt", "weights run from 0 to 3"),
        ({"negative_prompt": "(blurry:50)"}, "negative_prompt", "weights run from 0 to 3"),
    ],
)
def test_prompt_weights_out_of_range_or_nested_too_deep_are_refused(client, small_request, fields, field, words):
    response = client.post("/jobs", json=small_request(**fields))

    assert field_of(response) == ["body", field] and words in response.json()["detail"][0]["msg"]


def test_a_weight_a_style_brings_is_checked_with_the_style_applied(client, small_request):
    client.put("/styles/shout", json={"prompt": "({prompt}:9)"})

    response = client.post("/jobs", json=small_request(styles=["shout"]))

    assert field_of(response) == ["body", "prompt"] and "with its styles applied" in response.json()["detail"][0]["msg"]


def test_weights_users_write_are_accepted(client, small_request):
    body = small_request(prompt="((a red circle)), (blue background:1.4), [[soft]], (shadow:0)", negative_prompt="(blurry:2.0)")

    assert client.post("/jobs", json=body).status_code == 202


# --- sessions -------------------------------------------------------------------------------------------------


@pytest.fixture
def secured_client(settings, app_factory):
    """A client of the app with keys on, and a key of alice's."""
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        yield client, client.post("/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]


def test_signing_out_ends_the_session_at_once(secured_client, small_request):
    client, key = secured_client
    csrf = client.post("/session", json={"api_key": key}).json()["csrf_token"]
    cookie = client.cookies[SESSION_COOKIE]

    signed_out = client.delete("/session", headers={CSRF_HEADER: csrf})
    client.cookies.set(SESSION_COOKIE, cookie)  # the same cookie, kept by whoever had it
    read = client.get("/session")
    change = client.post("/jobs", json=small_request(), headers={CSRF_HEADER: csrf})

    assert signed_out.status_code == 204
    assert read.status_code == 401 and change.status_code == 401


def test_signing_out_on_one_replica_ends_the_session_on_another(settings, app_factory):
    settings.admin_key, settings.session_secret = ADMIN_KEY, "a secret every replica shares"
    with TestClient(app_factory(settings)) as replica_a, TestClient(app_factory(settings)) as replica_b:
        key = replica_a.post("/keys", json={"user_id": "alice"}, headers={"X-API-Key": ADMIN_KEY}).json()["key"]
        replica_a.post("/session", json={"api_key": key})
        cookie = replica_a.cookies[SESSION_COOKIE]
        replica_b.cookies.set(SESSION_COOKIE, cookie)
        before = replica_b.get("/session").status_code
        replica_a.delete("/session")
        after = replica_b.get("/session").status_code

    assert (before, after) == (200, 401)


@pytest.mark.parametrize("cookie", ["\xe9t\xe9", "abc.\xe9.sig", "a.1.\xff"])
def test_a_cookie_with_a_non_ascii_byte_is_401_not_500(secured_client, cookie):
    client, _ = secured_client

    response = client.get("/session", headers={"Cookie": f"{SESSION_COOKIE}={cookie}".encode("latin-1")})

    assert response.status_code == 401


def test_a_csrf_token_with_a_non_ascii_byte_is_403_not_500(secured_client, small_request):
    client, key = secured_client
    client.post("/session", json={"api_key": key})

    response = client.post("/jobs", json=small_request(), headers={CSRF_HEADER: "t\xe9st".encode("latin-1")})

    assert response.status_code == 403


# --- lists and webhooks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position", ["0001-01-01T00:00:00+05:00|" + "0" * 32, "2026-01-01T00:00:00|x\x00y", "2026-01-01T00:00:00|a|b", "nonsense|x"]
)
def test_a_cursor_that_is_not_ours_is_422_naming_it(client, position):
    cursor = base64.urlsafe_b64encode(position.encode()).decode()

    assert field_of(client.get("/jobs", params={"cursor": cursor})) == ["query", "cursor"]


@pytest.mark.parametrize("url", ["http://[fec0::1]/x", "http://192.0.0.8/x", "http://[64:ff9b::a00:1]/x", "http://[::ffff:169.254.169.254]/x"])
def test_a_webhook_to_an_address_that_is_not_globally_routable_is_refused(settings, app_factory, small_request, url):
    settings.webhook_allow_private = False
    with TestClient(app_factory(settings)) as client:
        jobs = client.post("/jobs", json=small_request(webhook_url=url))
        trainings = client.post(
            "/users/alice/trainings",
            files=[("images", (f"{index}.png", png_bytes(index, 64), "image/png")) for index in range(3)],
            data={**TRAINING_FIELDS, "webhook_url": url},
        )

    assert field_of(jobs) == ["body", "webhook_url"] and field_of(trainings) == ["body", "webhook_url"]


def test_a_photo_file_over_the_per_photo_cap_is_refused_before_it_is_read(client, small_photos, monkeypatch):
    from sd_server.api.routes import trainings as trainings_route

    monkeypatch.setattr(trainings_route, "MAX_PHOTO_BYTES", 10_000)
    files = [("images", (f"{index}.png", png_bytes(index, 64), "image/png")) for index in range(3)]

    response = train(client, files=files)

    assert field_of(response) == ["body", "images"] and "0.png: " in response.json()["detail"][0]["msg"] and "at most 10000" in response.json()["detail"][0]["msg"]


def test_a_training_upload_over_its_own_cap_is_413_naming_the_setting(settings, app_factory):
    settings.max_training_upload_bytes = 10_000
    with TestClient(app_factory(settings)) as client:
        response = train(client)

    assert response.status_code == 413 and "SD_MAX_TRAINING_UPLOAD_BYTES" in response.json()["detail"]
