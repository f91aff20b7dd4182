"""What the provenance marks cost and how well the watermark survives: demo images at 256x256 drawn by the demo model,
each marked as the service marks it (watermark, XMP, signed C2PA credentials), the time that adds measured against
drawing and encoding it; then each
marked image is put through what sharing does (JPEG 75, a 50% resize, a 10% crop, a screenshot-like PNG re-encode
that drops the metadata, a resize then JPEG) and its watermark read back. Unmarked images check for false alarms.

    python benchmarks/bench_provenance.py --images 100 --json benchmarks/results/provenance-cpu.json

It also reads the watermark off scikit-image's photographs (at 512 and 256 pixels), and, when the invisible-watermark
package is installed (pip install --no-deps invisible-watermark PyWavelets: its opencv-python requirement would
replace the headless OpenCV), measures its dwtDct and dwtDctSvd methods on the same demo images for comparison.
"""

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import Settings  # noqa: E402
from sd_server.demo.personalisation import drift_prompts  # noqa: E402
from sd_server.engine.png import encode_png  # noqa: E402
from sd_server.provenance import watermark  # noqa: E402
from sd_server.provenance.credentials import read_credentials  # noqa: E402
from sd_server.provenance.marks import ImageFacts, Provenance, fingerprint  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    """The image as a JPEG of that quality, decoded again."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def halved(image: Image.Image) -> Image.Image:
    """The image at half its width and height."""
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)


def cropped(image: Image.Image) -> Image.Image:
    """The image with 10% of its width and height cut away, 5% off each edge."""
    dx, dy = image.width // 20, image.height // 20
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def screenshot(image: Image.Image) -> Image.Image:
    """The pixels alone re-encoded as an RGBA PNG (a screenshot keeps no metadata), decoded again."""
    buffer = io.BytesIO()
    image.convert("RGBA").save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as served": lambda image: image,
    "JPEG 75": jpeg,
    "50% resize": halved,
    "10% crop": cropped,
    "screenshot PNG": screenshot,
    "50% resize, then JPEG 75": lambda image: jpeg(halved(image)),
}


PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def photograph_rows(strength: float) -> dict[str, dict[str, float]]:
    """The watermark's detection after each transform on scikit-image's photographs, at 512 and 256 pixels."""
    from skimage import data

    rows = {}
    for side in (512, 256):
        hits = dict.fromkeys(TRANSFORMS, 0)
        for name in PHOTOGRAPHS:
            picture = Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side))
            payload = watermark.WatermarkPayload(1, "0badcafe03")
            marked = watermark.embed(picture, payload, strength)
            for transform, change in TRANSFORMS.items():
                hits[transform] += watermark.read(change(marked)).payload == payload
        rows[f"{len(PHOTOGRAPHS)} photographs at {side}px"] = {name: round(hit / len(PHOTOGRAPHS), 3) for name, hit in hits.items()}
    return rows


def invisible_watermark_rows(pictures: list[Image.Image]) -> dict[str, dict[str, float]]:
    """The invisible-watermark package's methods (48 bits, as Stability's scripts use them) on the same pictures,
    read back exactly after each transform (a resized copy is stretched back first: its reader needs 256x256)."""
    try:
        import cv2
        import numpy as np
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        return {}
    rows = {}
    for method in ("dwtDct", "dwtDctSvd"):
        hits = dict.fromkeys(TRANSFORMS, 0)
        for index, picture in enumerate(pictures):
            payload = index.to_bytes(6, "big")
            encoder = WatermarkEncoder()
            encoder.set_watermark("bytes", payload)
            marked = Image.fromarray(cv2.cvtColor(encoder.encode(cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR), method), cv2.COLOR_BGR2RGB))
            for transform, change in TRANSFORMS.items():
                seen = change(marked).resize(picture.size)
                decoded = WatermarkDecoder("bytes", 48).decode(cv2.cvtColor(np.asarray(seen), cv2.COLOR_RGB2BGR), method)
                hits[transform] += decoded == payload
        rows[f"invisible-watermark {method}"] = {name: round(hit / len(pictures), 3) for name, hit in hits.items()}
    return rows


def milliseconds(samples: list[float]) -> float:
    """The median of ``samples`` (seconds), in milliseconds."""
    return round(1000 * statistics.median(samples), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30, help="denoising steps a picture (the API's default is 30)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipeline = StableDiffusionPipeline.from_pretrained(PROJECT_DIR / "models" / "demo", safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as data_dir:
        provenance = Provenance(Settings(data_dir=Path(data_dir)))
        draw, mark, reads, psnr = [], {"all marks": [], "watermark": [], "metadata and credentials": []}, [], []
        survived = dict.fromkeys(TRANSFORMS, 0)
        false_alarms, signatures_valid, channels = 0, 0, {"Cb": 0, "Y": 0}
        originals = []
        for index, prompt in enumerate(drift_prompts(arguments.images)):
            started = time.perf_counter()
            generator = torch.Generator("cpu").manual_seed(index)
            image = pipeline(prompt, num_inference_steps=arguments.steps, width=arguments.size, height=arguments.size, generator=generator).images[0]
            png = encode_png(image, prompt)
            draw.append(time.perf_counter() - started)
            originals.append(image)
            facts = ImageFacts(uuid.uuid4().hex, index % 4, "demo", prompt, fingerprint(prompt))
            started = time.perf_counter()
            watermarked = provenance.watermark(image, facts)
            mark["watermark"].append(time.perf_counter() - started)
            png = encode_png(watermarked, prompt)  # the engine encodes the picture either way
            started = time.perf_counter()
            marked = provenance.seal(png, facts)
            mark["metadata and credentials"].append(time.perf_counter() - started)
            mark["all marks"].append(mark["watermark"][-1] + mark["metadata and credentials"][-1])
            reading = read_credentials(marked, provenance.trust_anchors)
            signatures_valid += reading is not None and reading.signature_holds
            served = Image.open(io.BytesIO(marked)).convert("RGB")
            error = float(np.mean((np.asarray(served, dtype=np.float64) - np.asarray(image, dtype=np.float64)) ** 2))
            psnr.append(10 * np.log10(255**2 / max(error, 1e-9)))
            expected = watermark.WatermarkPayload(provenance.settings.watermark_service_id, facts.fingerprint)
            for name, transform in TRANSFORMS.items():
                started = time.perf_counter()
                survived[name] += watermark.read(transform(served)).payload == expected
                reads.append(time.perf_counter() - started)
            channels[str(watermark.read(served, search_crops=False).channel)] += 1
            false_alarms += watermark.read(image).payload is not None
    count = arguments.images
    figures = {
        "images": count,
        "size": arguments.size,
        "steps": arguments.steps,
        "draw_ms": milliseconds(draw),
        "mark_ms": {name: milliseconds(samples) for name, samples in mark.items()},
        "mark_share_of_draw": round(statistics.median(mark["all marks"]) / statistics.median(draw), 4),
        "watermark_read_ms_median": milliseconds(reads),
        "watermark_read_ms_max": round(1000 * max(reads), 1),
        "signatures_valid": signatures_valid,
        "detected": {name: round(hits / count, 3) for name, hits in survived.items()},
        "false_alarms_on_unmarked": false_alarms,
        "watermark_channel": channels,
        "watermark_strength": Settings().watermark_strength,
        "psnr_db_median": round(statistics.median(psnr), 1),
        "other_pictures": photograph_rows(Settings().watermark_strength) | invisible_watermark_rows(originals),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }
    print(f"| drawing a {arguments.size}px demo image, {arguments.steps} steps, PNG | {figures['draw_ms']} ms |")
    for name, value in figures["mark_ms"].items():
        print(f"| {name} | {value} ms |")
    print(f"| all marks / drawing | {100 * figures['mark_share_of_draw']:.1f}% |")
    for name, share in figures["detected"].items():
        print(f"| watermark read after {name} | {100 * share:.0f}% of {count} |")
    print(f"| false alarms on {count} unmarked images | {false_alarms} |")
    print(f"| PSNR of the marked image (median) | {figures['psnr_db_median']} dB |")
    for row, detected in figures["other_pictures"].items():
        print(f"| {row} | " + ", ".join(f"{name} {100 * share:.0f}%" for name, share in detected.items()) + " |")
    print(json.dumps(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
