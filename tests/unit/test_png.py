"""PNG encoding with the parameters chunk, and unique file names under concurrency."""

import io
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from sd_server.engine.png import a1111_parameters, encode_png, with_parameters
from sd_server.storage.images import LocalStorage, image_name


def test_parameters_text_follows_a1111_and_omits_an_empty_negative_prompt():
    text = a1111_parameters("a cat", None, 30, "Euler a", 7.5, 42, 512, 768, "demo")

    assert text == "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: demo"


def test_encoded_png_carries_the_parameters_chunk():
    png = encode_png(Image.new("RGB", (8, 8), "red"), "a cat\nSteps: 1")

    assert Image.open(io.BytesIO(png)).text == {"parameters": "a cat\nSteps: 1"}


def test_parameters_added_to_an_encoded_png_read_back_as_pillow_writes_them():
    image = Image.new("RGB", (8, 8), "red")
    for text in ("a cat\nSteps: 1", "un café (über:1.2) 猫\nSteps: 1"):  # Latin-1 (tEXt) and beyond it (iTXt)
        png = with_parameters(encode_png(image), text)

        decoded = Image.open(io.BytesIO(png))
        decoded.load()  # checks every chunk's CRC
        assert decoded.text == {"parameters": text}
        assert png == encode_png(image, text), "byte for byte what Pillow writes"


def test_concurrent_saves_of_the_same_seed_never_overwrite_each_other(tmp_path):
    storage = LocalStorage(tmp_path / "output")
    payloads = [f"image {index}".encode() for index in range(32)]

    def save(payload: bytes) -> str:
        key = image_name(seed=42)
        storage.put(key, payload)
        return key

    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(save, payloads))

    assert len(set(keys)) == 32
    assert sorted(storage.local_path(key).read_bytes() for key in keys) == sorted(payloads)
