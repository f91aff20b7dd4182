"""What live previews cost: the engine's own loop (``raw_loop.py``, on a worker thread as the device thread runs it)
without previews and with SD_PREVIEW_EVERY=N, in interleaved rounds of fresh processes, at each batch size; and,
since a few percent drown in a shared machine's drift between runs, the preview work itself timed directly (the
projection of a batch's latents and its JPEGs, and the one-time fit on the model's VAE), as a share of an image's
time. Prints each row (the target: previews cost under 3 %); ``--json`` writes them.

    .venv/bin/python benchmarks/bench_previews.py --rounds 3 --json benchmarks/results/previews-cpu.json
    .venv/bin/python benchmarks/bench_previews.py --requests 2 --steps 2 --rounds 1 --batches 1   # smoke size
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from bench_serving import DEMO_MODEL_DIR, run_json
from sd_server.engine.previews import PreviewCopy, fit_projection


def loop(arguments: argparse.Namespace, batch: int, preview_every: int) -> dict:
    """One run of the raw loop in a fresh process."""
    return run_json([
        "benchmarks/raw_loop.py", "--model", str(arguments.model), "--thread", "worker", "--batch", str(batch),
        "--requests", str(arguments.requests), "--steps", str(arguments.steps), "--size", str(arguments.size),
        "--preview-every", str(preview_every),
    ])  # fmt: skip


def preview_seconds(arguments: argparse.Namespace, batch: int, repeats: int = 50) -> tuple[float, float]:
    """Seconds of one preview of a batch of ``batch`` images (latents to JPEGs), and of the one-time fit."""
    vae = AutoencoderKL.from_pretrained(arguments.model / "vae", torch_dtype=torch.float32)
    started = time.perf_counter()
    projection = fit_projection(vae)
    fit_s = time.perf_counter() - started
    latents = torch.randn(batch, vae.config.latent_channels, arguments.size // 8, arguments.size // 8)
    started = time.perf_counter()
    for _ in range(repeats):
        PreviewCopy(latents, projection, arguments.size, arguments.size).jpegs()
    return (time.perf_counter() - started) / repeats, fit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    parser.add_argument("--preview-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()

    rows = []
    for batch in (int(size) for size in arguments.batches.split(",")):
        rounds = [(loop(arguments, batch, 0), loop(arguments, batch, arguments.preview_every)) for _ in range(arguments.rounds)]
        without = statistics.median(off["images_per_s"] for off, _ in rounds)
        one_preview_s, fit_s = preview_seconds(arguments, batch)
        previews_per_batch = len(range(arguments.preview_every, arguments.steps, arguments.preview_every))
        row = {
            "batch": batch,
            "images_per_s_without": without,
            "images_per_s_with": statistics.median(on["images_per_s"] for _, on in rounds),
            "with_over_without": round(statistics.median(on["images_per_s"] / off["images_per_s"] for off, on in rounds), 4),
            "preview_ms_per_batch": round(one_preview_s * 1000, 3),
            "fit_ms_once_per_model": round(fit_s * 1000, 1),
            "preview_share_of_image_time": round(previews_per_batch * one_preview_s / (batch / without), 5),
        }
        rows.append(row)
        print(json.dumps(row))
    result = {"settings": {name: str(value) for name, value in vars(arguments).items()}, "rows": rows}
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
