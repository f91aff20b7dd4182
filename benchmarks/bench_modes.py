"""Throughput per mode: txt2img, img2img and inpainting through the real server (batching on), side by side.

img2img and inpainting send a 256-pixel init picture (and a mask) with every request, and run
int(steps x strength) denoising steps. Prints images/s, denoising steps/s, latency p50/p95 and the mean batch for
each mode. Examples:

    .venv/bin/python benchmarks/bench_modes.py                        # demo model, CPU-sized defaults
    .venv/bin/python benchmarks/bench_modes.py --sd15 --size 512 --steps 30 --requests 64 --concurrency 16
"""

import argparse
import asyncio
import base64
import io
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import add_load_arguments, request_body, resolve_model, run_load, start_server  # noqa: E402

MODES = ("txt2img", "img2img", "inpaint")


def encoded(image: Image.Image) -> str:
    """A picture as a base64 PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mode_fields(mode: str, size: int, strength: float) -> dict:
    """What a request of ``mode`` adds to the text-to-image body: an init picture (a red circle), and a mask."""
    if mode == "txt2img":
        return {}
    init = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(init).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    fields = {"init_image": encoded(init), "strength": strength}
    if mode == "inpaint":
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
        fields["mask_image"] = encoded(mask)
    return fields


def body_for(mode: str, arguments: argparse.Namespace) -> Callable[[int], dict]:
    """Request ``index`` of a run in ``mode``."""
    fields = mode_fields(mode, arguments.size, arguments.strength)
    return lambda index: {**request_body(index, arguments), **fields}


def steps_run(mode: str, arguments: argparse.Namespace) -> int:
    """Denoising steps one image of ``mode`` runs."""
    strength = 1.0 if mode == "txt2img" else arguments.strength
    return min(int(arguments.steps * strength), arguments.steps)


def measure(model: str, arguments: argparse.Namespace) -> dict:
    """Every mode on one server, one after the other."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as data_dir:
        process, url = start_server(model, arguments.max_batch_size, arguments, Path(data_dir), {"SD_BATCH_WAIT_MS": "50"})
        try:
            for mode in MODES:
                row = asyncio.run(run_load(url, arguments, body_for(mode, arguments)))
                row["steps_per_s"] = round(row["images_per_s"] * steps_run(mode, arguments), 2)
                figures[mode] = row
        finally:
            process.terminate()
            process.wait(timeout=60)
    return figures


def print_table(figures: dict, arguments: argparse.Namespace) -> None:
    """The figures as a markdown table."""
    print(f"\nmodel={arguments.model_used} size={arguments.size} steps={arguments.steps} strength={arguments.strength} "
          f"requests={arguments.requests} concurrency={arguments.concurrency} device={figures['txt2img']['device']}")
    print("| mode | images/s | denoising steps/s | p50 s | p95 s | mean batch |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        row = figures[mode]
        print(f"| {mode} | {row['images_per_s']:.3f} | {row['steps_per_s']:.2f} | {row['latency_p50_s']:.3f} | "
              f"{row['latency_p95_s']:.3f} | {row['mean_batch_size']:.2f} |")


def main() -> None:
    """Parse arguments, measure each mode, print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    arguments.model_used = resolve_model(arguments)

    figures = measure(arguments.model_used, arguments)
    print_table(figures, arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
