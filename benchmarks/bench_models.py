"""Model-switching benchmark: how fast one device serves many users' models.

Prints time to first image for a cold checkpoint (from disk), a checkpoint in the host RAM tier, a resident
LoRA and a non-resident LoRA (its base resident); the cost of switching between resident adapters; images/s
with 1, 10 and 100 LoRA users in rotation; and the bytes each extra user costs as a checkpoint (DreamBooth,
sharing the base's VAE and text encoder), a fully distinct checkpoint, and a LoRA. In-process, on ModelService.

Usage: python benchmarks/bench_models.py [--sd15] [--steps 20] [--size 512] [--users 1,10,100] [--json FILE]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import Settings  # noqa: E402
from model_service import ModelService  # noqa: E402
from sd_server.demo.random_pipeline import save_random_lora, save_random_pipeline  # noqa: E402
from sd_server.domain.models import CheckpointModel, LoraModel, UserModel  # noqa: E402
from sd_server.engine.devices import GIB  # noqa: E402
from sd_server.engine.interface import BatchItem, BatchKey  # noqa: E402


def build_models(folder: Path, sd15: bool, loras: int, rank: int) -> None:
    """`base`, `dreambooth` (base's VAE and text encoder, its own UNet), `distinct`, and LoRAs `loras/user-N`."""
    if sd15:
        from sd15_random import build_sd15_random_pipeline, save_sd15_random

        save_model, unet = save_sd15_random, build_sd15_random_pipeline().unet
    else:
        save_model, unet = save_random_pipeline, None
    save_model(folder / "base", seed=0)
    save_model(folder / "dreambooth", seed=0, unet_seed=1)
    save_model(folder / "distinct", seed=2)
    for index in range(loras):
        save_random_lora(folder / "loras" / f"user-{index}.safetensors", seed=index, rank=rank, unet=unet)


def first_image_seconds(service: ModelService, model: UserModel, arguments: argparse.Namespace) -> float:
    """Seconds from asking for ``model`` to its first image: load or move as the loader would, then one batch."""
    started = time.perf_counter()
    assert service.prepare(model), "no room on the device"
    key = BatchKey(model.base, arguments.size, arguments.size, arguments.steps, 7.5, None)
    service.run_batch(key, [BatchItem(model, "a photo of sks person", None, 1, 1)], lambda step, total, previews=None: None, lambda: False)
    if service.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def lora(index: int) -> LoraModel:
    """The LoRA of user ``index``, on the base checkpoint."""
    return LoraModel(base="base", source=f"loras/user-{index}.safetensors")


def measure(folder: Path, arguments: argparse.Namespace) -> dict:
    """Every figure of the benchmark, on a fresh ModelService per part."""
    settings = Settings(
        _env_file=None, models_dir=folder, data_dir=folder / "data", max_adapters=arguments.max_adapters, cache_cpu_gb=64
    )
    base, distinct = CheckpointModel(source="base"), CheckpointModel(source="distinct")
    service = ModelService(settings)
    figures = {"device": service.device, "dtype": str(service.dtype).removeprefix("torch.")}
    first_image_seconds(service, base, arguments)  # warm-up: kernels, allocator
    service.unload()
    figures["cold_checkpoint_s"] = first_image_seconds(service, base, arguments)
    figures["resident_checkpoint_s"] = first_image_seconds(service, base, arguments)
    figures["nonresident_lora_s"] = first_image_seconds(service, lora(0), arguments)
    first_image_seconds(service, lora(1), arguments)
    figures["resident_lora_s"] = first_image_seconds(service, lora(0), arguments)
    figures["adapter_switch_ms"] = adapter_switch_ms(service)
    report = service.cache_report()
    figures["disk_load_s"] = report["cpu"]["load_seconds"] / report["cpu"]["misses"]
    figures["adapter_load_s"] = report["adapters"]["load_seconds"] / report["adapters"]["misses"]

    one_model = service.cache_report()["device"]["bytes"] - service.cache_report()["adapters"]["bytes"]
    settings.cache_device_gb = 1.5 * one_model / GIB  # room for one checkpoint: loading another moves base to host RAM
    service = ModelService(settings)
    first_image_seconds(service, base, arguments)
    first_image_seconds(service, distinct, arguments)
    figures["cpu_tier_checkpoint_s"] = first_image_seconds(service, base, arguments)
    device = service.cache_report()["device"]
    figures["to_device_s"] = device["load_seconds"] / device["misses"]  # host RAM -> device, and the moves down

    figures["bytes_per_user"] = bytes_per_user(ModelService(settings.model_copy(update={"cache_device_gb": 64})), arguments)
    figures["rotation"] = {str(users): rotation(settings, users, arguments) for users in arguments.users}
    return figures


def adapter_switch_ms(service: ModelService) -> float:
    """Median milliseconds of set_adapters between two adapters already loaded in the base pipeline."""
    checkpoint = service.cache.checkpoints["base"]
    names = list(checkpoint.adapters)[-2:]
    timings = []
    for index in range(50):
        started = time.perf_counter()
        checkpoint.pipeline.set_adapters([names[index % 2]], [1.0])
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def bytes_per_user(service: ModelService, arguments: argparse.Namespace) -> dict:
    """Bytes the device tier grows by for one more user of each kind."""
    grown = {}
    before = 0
    for kind, model in (
        ("base", CheckpointModel(source="base")),
        ("dreambooth_checkpoint", CheckpointModel(source="dreambooth")),
        ("distinct_checkpoint", CheckpointModel(source="distinct")),
        ("lora", lora(0)),
    ):
        first_image_seconds(service, model, arguments)
        now = service.cache_report()["device"]["bytes"]
        grown[kind], before = now - before, now
    return grown


def rotation(settings: Settings, users: int, arguments: argparse.Namespace) -> dict:
    """Images/s when ``users`` LoRA users on one base take turns, one image each, round after round."""
    service = ModelService(settings.model_copy(update={"cache_device_gb": 64}))
    first_image_seconds(service, CheckpointModel(source="base"), arguments)
    images = max(2 * users, arguments.min_images)
    started = time.perf_counter()
    for index in range(images):
        first_image_seconds(service, lora(index % users), arguments)
    seconds = time.perf_counter() - started
    adapters = service.cache_report()["adapters"]
    return {"images_per_s": images / seconds, "adapter_loads": adapters["misses"], "images": images}


def print_table(figures: dict, arguments: argparse.Namespace) -> None:
    """The figures as the table the README shows."""
    print(f"\n{figures['device']} {figures['dtype']}, {arguments.size}x{arguments.size}, {arguments.steps} steps, "
          f"LoRA rank {arguments.rank}, SD_MAX_ADAPTERS={arguments.max_adapters}")
    print("| time to first image | seconds |\n|---|---|")
    for label, key in (
        ("resident checkpoint (generation alone)", "resident_checkpoint_s"),
        ("cold checkpoint (from disk)", "cold_checkpoint_s"),
        ("checkpoint in the CPU tier", "cpu_tier_checkpoint_s"),
        ("resident LoRA (switch from another)", "resident_lora_s"),
        ("non-resident LoRA (base resident)", "nonresident_lora_s"),
    ):
        print(f"| {label} | {figures[key]:.3f} |")
    print("\n| part of a switch | seconds |\n|---|---|")
    print(f"| checkpoint from disk to host RAM (from_pretrained) | {figures['disk_load_s']:.3f} |")
    print(f"| checkpoint from host RAM to the device | {figures['to_device_s']:.3f} |")
    print(f"| LoRA loaded into its resident base | {figures['adapter_load_s']:.3f} |")
    print(f"| switch between resident adapters (set_adapters) | {figures['adapter_switch_ms'] / 1000:.4f} |")
    print("\n| LoRA users in rotation | images/s | adapter loads |\n|---|---|---|")
    for users, result in figures["rotation"].items():
        print(f"| {users} | {result['images_per_s']:.2f} | {result['adapter_loads']} of {result['images']} images |")
    print("\n| one more user | bytes on the device |\n|---|---|")
    for kind, grown in figures["bytes_per_user"].items():
        print(f"| {kind} | {grown:,} ({grown / 1024**2:.1f} MiB) |")


def main() -> None:
    """Build the models in a temporary folder, measure, print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="full-size SD1.5 with random weights (else the demo model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank; default 16 with --sd15, 4 otherwise")
    parser.add_argument("--users", type=lambda text: [int(n) for n in text.split(",")], default=[1, 10, 100])
    parser.add_argument("--min-images", type=int, default=20, help="images per rotation run, at least")
    parser.add_argument("--max-adapters", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    arguments.rank = arguments.rank or (16 if arguments.sd15 else 4)
    with tempfile.TemporaryDirectory() as folder:
        build_models(Path(folder), arguments.sd15, max(arguments.users), arguments.rank)
        figures = measure(Path(folder), arguments)
    print_table(figures, arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
