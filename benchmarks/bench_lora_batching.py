"""Batching across users' LoRAs. Two parts, each printing a table:

- serving: images/s with 1, 4 and 16 distinct LoRA users sending concurrently (C clients), batching across adapters
  off vs on (SD_BATCH_ACROSS_ADAPTERS), against the real server on the demo model, with the mean batch size;
- unet: the cost of the mixing itself, one UNet call (both halves of classifier-free guidance) on a batch of B images
  with B distinct adapters, one adapter for all, or none; on the demo model or a full-size SD1.5 with random weights.
  With ``--slot-ranks``, also B distinct adapters from SD_COMPILE's LoRA slots of each rank (run uncompiled here: the
  cost of padding every adapter to the slots' rank, on every layer LoRAs may target).

    .venv/bin/python benchmarks/bench_lora_batching.py --rounds 3                        # both parts, demo model
    .venv/bin/python benchmarks/bench_lora_batching.py --part unet --sd15 --batch-sizes 4 --repeats 1   # SD1.5, CPU
    .venv/bin/python benchmarks/bench_lora_batching.py --part unet --sd15 --size 256 --batch-sizes 2 --rank 8 --slot-ranks 8,16,32,64
    python benchmarks/bench_lora_batching.py --part unet --sd15 --batch-sizes 1,4,8,16 --repeats 20     # on a GPU
"""

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sd_server.demo.random_pipeline import save_random_lora  # noqa: E402
from sd_server.engine.compiled import wrap_lora_layers  # noqa: E402
from sd_server.engine.compiled_lora import LoraSlots  # noqa: E402
from sd_server.engine.mixed_adapters import SampleAdapter, adapters_applied  # noqa: E402

DEMO_MODEL_DIR = ROOT / "models" / "demo"


# --- serving --------------------------------------------------------------------------------------------------------


def prepare_models(folder: Path, users: int, rank: int) -> dict[str, dict]:
    """A models folder with the demo model and one LoRA per user; the SD_USER_MODELS mapping for them."""
    shutil.copytree(DEMO_MODEL_DIR, folder / "demo")
    unet = StableDiffusionPipeline.from_pretrained(folder / "demo").unet
    models = {}
    for index in range(users):
        save_random_lora(folder / "loras" / f"user-{index}.safetensors", seed=index, rank=rank, unet=unet, spread=0.05)
        models[f"user-{index}"] = {"kind": "lora", "base": "demo", "source": f"loras/user-{index}.safetensors"}
    return models


def serve_users(users: int, across: bool, arguments: argparse.Namespace) -> dict:
    """One run: the server on the demo model with ``users`` LoRA users, request i from user i mod ``users``."""
    from bench_serving import request_body, run_load, start_server

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as scratch:
        folder = Path(scratch)
        models = prepare_models(folder / "models", users, arguments.rank)
        extra = {
            "SD_MODELS_DIR": str(folder / "models"),
            "SD_USER_MODELS": json.dumps(models),
            "SD_BATCH_ACROSS_ADAPTERS": str(across).lower(),
            "SD_BATCH_WAIT_MS": str(arguments.batch_wait_ms),
        }
        process, url = start_server("demo", arguments.max_batch_size, arguments, folder / "data", extra)
        try:
            body = lambda index: {**request_body(index, arguments), "user_id": f"user-{index % users}"}  # noqa: E731
            figures = asyncio.run(run_load(url, arguments, body, warm_ups=users))
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"users": users, "across_adapters": across, **{k: v for k, v in figures.items() if k != "device"}}


def serving_table(arguments: argparse.Namespace) -> list[dict]:
    """Every user count with batching across adapters off, then on, ``--rounds`` times interleaved (this machine's
    run-to-run noise is large); the median run of each, printed as a table."""
    runs = [serve_users(users, across, arguments) for _ in range(arguments.rounds) for users in arguments.users for across in (False, True)]
    rows = []
    for users in arguments.users:
        for across in (False, True):
            mine = sorted((run for run in runs if run["users"] == users and run["across_adapters"] == across), key=lambda run: run["images_per_s"])
            rows.append({**mine[len(mine) // 2], "images_per_s_runs": [run["images_per_s"] for run in mine]})
    one_user = statistics.median(run["images_per_s"] for run in runs if run["users"] == min(arguments.users))
    print(f"\nServing: {arguments.requests} requests from {arguments.concurrency} clients, {arguments.size}x{arguments.size}, "
          f"{arguments.steps} steps, SD_MAX_BATCH_SIZE={arguments.max_batch_size}, LoRA rank {arguments.rank}, "
          f"median of {arguments.rounds} run(s)")  # fmt: skip
    print(f"| LoRA users | across adapters | images/s | runs | of {min(arguments.users)} user's | mean batch size | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        runs_text = " / ".join(f"{value:.2f}" for value in row["images_per_s_runs"])
        print(f"| {row['users']} | {'on' if row['across_adapters'] else 'off'} | {row['images_per_s']:.3f} | {runs_text} | "
              f"{row['images_per_s'] / one_user:.2f} | {row['mean_batch_size']:.2f} | {row['latency_p50_s']:.2f} | "
              f"{row['latency_p99_s']:.2f} |")  # fmt: skip
    print(f"(the {min(arguments.users)}-user figure is the median of all its runs, off and on: for one user they are the same)")
    return rows


# --- the UNet call --------------------------------------------------------------------------------------------------


def load_pipeline(arguments: argparse.Namespace, folder: Path) -> tuple[StableDiffusionPipeline, list[str]]:
    """The demo model or SD1.5 with random weights, on the device, with max(B) random LoRAs loaded."""
    if arguments.sd15:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from sd15_random import build_sd15_random_pipeline

        pipeline = build_sd15_random_pipeline()
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(DEMO_MODEL_DIR)
    if arguments.slot_ranks:
        wrap_lora_layers(pipeline.unet)  # as SD_COMPILE does: the slots then cover every layer LoRAs may target
    names = []
    for index in range(max(arguments.batch_sizes)):
        path = save_random_lora(folder / f"lora-{index}.safetensors", seed=index, rank=arguments.rank, unet=pipeline.unet, spread=0.05)
        pipeline.load_lora_weights(str(path), adapter_name=f"lora_{index}")
        names.append(f"lora_{index}")
    dtype = torch.float16 if arguments.device == "cuda" else torch.float32
    return pipeline.to(arguments.device, dtype), names


def samples_for(mode: str, names: list[str]) -> list[SampleAdapter]:
    """One image per name: with no adapter, all with the first adapter, or each with its own."""
    return {
        "none": [SampleAdapter(None)] * len(names),
        "one adapter": [SampleAdapter(names[0])] * len(names),
        "distinct adapters": [SampleAdapter(name) for name in names],
    }[mode]


def unet_inputs(unet, batch: int, arguments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded latents and text embeddings for 2 x ``batch`` samples (classifier-free guidance), and a timestep."""
    generator, side = torch.Generator().manual_seed(0), arguments.size // 8
    latents = torch.randn(2 * batch, unet.config.in_channels, side, side, generator=generator)
    text = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=generator)
    device = arguments.device
    return latents.to(device, unet.dtype), text.to(device, unet.dtype), torch.tensor(500, device=device)


@torch.no_grad()
def unet_call_seconds(pipeline: StableDiffusionPipeline, batch: int, mode: str, names: list[str], arguments) -> float:
    """Median seconds of one UNet call on 2 x ``batch`` latents (classifier-free guidance) in ``mode``."""
    with adapters_applied(pipeline, samples_for(mode, names[:batch])):
        return median_call_seconds(pipeline.unet, batch, arguments)


@torch.no_grad()
def slot_call_seconds(pipeline: StableDiffusionPipeline, batch: int, rank: int, names: list[str], arguments) -> float:
    """Median seconds of one UNet call with ``batch`` distinct adapters from LoRA slots of ``rank``."""
    slots = LoraSlots(pipeline.unet, batch, rank)
    samples = samples_for("distinct adapters", names[:batch])
    with adapters_applied(pipeline, samples, slotted=pipeline.unet), slots.applied(samples):
        slots.select(2 * batch, 2 * batch)
        return median_call_seconds(pipeline.unet, batch, arguments)


def median_call_seconds(unet, batch: int, arguments) -> float:
    """Median seconds of one call of ``unet`` on 2 x ``batch`` latents, after the warm-up calls."""
    latents, text, timestep = unet_inputs(unet, batch, arguments)
    times = []
    for index in range(arguments.warm_ups + arguments.repeats):
        synchronize(arguments.device)
        started = time.perf_counter()
        unet(latents, timestep, encoder_hidden_states=text)
        synchronize(arguments.device)
        if index >= arguments.warm_ups:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def mixing_error(pipeline: StableDiffusionPipeline, names: list[str], arguments) -> float:
    """Largest difference between a mixed call's output for each image and that image's call alone with its adapter,
    relative to the output's largest value."""
    unet, batch = pipeline.unet, len(names)
    latents, text, timestep = unet_inputs(unet, batch, arguments)
    with adapters_applied(pipeline, samples_for("distinct adapters", names)):
        mixed = unet(latents, timestep, encoder_hidden_states=text).sample
    error = 0.0
    for index, name in enumerate(names):
        rows = [index, batch + index]
        with adapters_applied(pipeline, samples_for("one adapter", [name])):
            alone = unet(latents[rows], timestep, encoder_hidden_states=text[rows]).sample
        error = max(error, ((mixed[rows] - alone).abs().max() / alone.abs().max()).item())
    return error


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()


def unet_table(arguments: argparse.Namespace) -> list[dict]:
    """Each batch size in each mode; printed as a table."""
    with tempfile.TemporaryDirectory(prefix="bench-lora-unet-") as scratch:
        pipeline, names = load_pipeline(arguments, Path(scratch))
        modes = ("none", "one adapter", "distinct adapters")
        rows = [
            {"batch": batch, **{mode: unet_call_seconds(pipeline, batch, mode, names, arguments) for mode in modes}}
            for batch in arguments.batch_sizes
        ]
        for row in rows:
            row["slots"] = {rank: slot_call_seconds(pipeline, row["batch"], rank, names, arguments) for rank in arguments.slot_ranks}
        error = mixing_error(pipeline, names[: min(4, len(names))], arguments)
    model = "SD1.5 (random weights)" if arguments.sd15 else "demo"
    device = torch.cuda.get_device_name() if arguments.device == "cuda" else arguments.device
    print(f"\nOne UNet call (CFG: 2 x B latents): {model}, {arguments.size}x{arguments.size}, LoRA rank {arguments.rank}, "
          f"{device}, median of {arguments.repeats}")  # fmt: skip
    print("| B | no adapter s | one adapter s | B distinct adapters s | distinct / one | B users: B calls of 1 / one mixed call |")
    print("|---|---|---|---|---|---|")
    alone = next((row["one adapter"] for row in rows if row["batch"] == 1), float("nan"))
    for row in rows:
        print(f"| {row['batch']} | {row['none']:.4f} | {row['one adapter']:.4f} | {row['distinct adapters']:.4f} | "
              f"{row['distinct adapters'] / row['one adapter']:.2f} | {row['batch'] * alone / row['distinct adapters']:.2f}x |")  # fmt: skip
    print(f"Largest difference of a mixed call's output from the same image alone: {error:.2e} of the output's range")
    if arguments.slot_ranks:
        print("\nB distinct adapters from SD_COMPILE's LoRA slots (uncompiled), against the per-image hooks")
        print("| B | " + " | ".join(f"slots rank {rank} s" for rank in arguments.slot_ranks) + " |")
        print("|---|" + "---|" * len(arguments.slot_ranks))
        for row in rows:
            cells = " | ".join(f"{row['slots'][rank]:.4f} ({row['slots'][rank] / row['distinct adapters']:.2f}x)" for rank in arguments.slot_ranks)
            print(f"| {row['batch']} | {cells} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("serving", "unet", "both"), default="both")
    parser.add_argument("--users", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="default: 256 (demo), 512 (--sd15)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="serving runs of each case, interleaved; the median is shown")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank; default: 4 (demo), 16 (--sd15)")
    parser.add_argument("--sd15", action="store_true", help="unet part: full-size SD1.5 with random weights")
    parser.add_argument("--batch-sizes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--slot-ranks", type=lambda text: [int(n) for n in text.split(",")], default=[], help="unet part: LoRA slots of these ranks too")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-ups", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    arguments.size = arguments.size or (512 if arguments.sd15 else 256)
    arguments.rank = arguments.rank or (16 if arguments.sd15 else 4)

    figures = {}
    if arguments.part in ("serving", "both"):
        figures["serving"] = serving_table(arguments)
    if arguments.part in ("unet", "both"):
        figures["unet"] = unet_table(arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
