"""PNG encoding with the parameters chunk, and unique file names under concurrency."""

import io
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from images import a1111_parameters, encode_png, save_png


def test_parameters_text_follows_a1111_and_omits_an_empty_negative_prompt():
    text = a1111_parameters("a cat", None, 30, "Euler a", 7.5, 42, 512, 768, "demo")

    assert text == "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: demo"


def test_encoded_png_carries_the_parameters_chunk():
    png = encode_png(Image.new("RGB", (8, 8), "red"), "a cat\nSteps: 1")

    assert Image.open(io.BytesIO(png)).text == {"parameters": "a cat\nSteps: 1"}


def test_concurrent_saves_of_the_same_seed_never_overwrite_each_other(tmp_path):
    payloads = [f"image {index}".encode() for index in range(32)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda payload: save_png(payload, tmp_path / "output", seed=42), payloads))

    assert len(set(paths)) == 32
    assert sorted(path.read_bytes() for path in paths) == sorted(payloads)
