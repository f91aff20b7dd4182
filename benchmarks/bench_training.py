"""Training benchmark: what a user's LoRA training costs, and what it does to generation meanwhile.

Prints seconds per training step and peak memory (CUDA: peak allocated; CPU: the process's peak resident set) for
the demo model, or for a full-size SD1.5 with random weights (``--sd15``; on CPU one step is enough to see the
cost); then, in the server (in-process, the real app), generation latency p50/p99 with no training and with a
training running, and their ratio; with ``--photos-to-model``, the seconds from uploading 10 photos to their LoRA
being the user's model, through the API, setup included.

Usage: python benchmarks/bench_training.py [--sd15 | --model DIR] [--steps 20] [--resolution 256] [--batch-size 1]
       [--requests 20] [--slice-steps 5] [--photos-to-model STEPS] [--json FILE]
On a GPU box: python benchmarks/bench_training.py --sd15 --steps 50 --resolution 512 --requests 40 --photos-to-model 400
"""

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import Settings  # noqa: E402
from sd_server.domain.trainings import TrainingSettings  # noqa: E402
from sd_server.engine.devices import choose_device  # noqa: E402
from sd_server.engine.lora_training import LoraTrainer  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent


def write_photos(folder: Path, count: int, resolution: int) -> list[Path]:
    """``count`` prepared photos (a random colour block, at a random place, on a random colour) at ``resolution``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = random.Random(0), []
    for index in range(count):
        image = Image.new("RGB", (resolution, resolution), tuple(rng.randrange(256) for _ in range(3)))
        left, top = rng.randrange(resolution // 2), rng.randrange(resolution // 2)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (left, top, left + resolution // 3, top + resolution // 2))
        path = folder / f"{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def peak_memory_bytes(device: str) -> int:
    """Peak device memory allocated (CUDA), else the process's peak resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_steps(model_dir: Path, arguments: argparse.Namespace, work: Path) -> dict:
    """Seconds per training step (after one warm-up step) and peak memory."""
    device = choose_device("auto", torch.cuda.is_available(), False)
    photos = write_photos(work / "photos", 8, arguments.resolution)
    settings = TrainingSettings(steps=arguments.steps + 1, resolution=arguments.resolution, batch_size=arguments.batch_size, rank=arguments.rank)
    started = time.perf_counter()
    trainer = LoraTrainer(str(model_dir), photos, settings, device)
    setup_s = time.perf_counter() - started
    trainer.run(1)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.run(arguments.steps)
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "device": device,
        "setup_s": round(setup_s, 2),
        "seconds_per_step": round((time.perf_counter() - started) / arguments.steps, 4),
        "peak_memory_bytes": peak_memory_bytes(device),
    }


def latencies(client, arguments: argparse.Namespace) -> list[float]:
    """Seconds of each of ``requests`` sequential 256x256, 20-step generations."""
    seconds = []
    for index in range(arguments.requests):
        body = {"prompt": "a red circle on a white background", "seed": index, "num_inference_steps": 20, "width": 256, "height": 256}
        started = time.perf_counter()
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        seconds.append(time.perf_counter() - started)
    return seconds


def percentiles(seconds: list[float]) -> dict:
    """p50 and p99 of ``seconds``."""
    ordered = sorted(seconds)
    return {"p50_s": round(statistics.median(ordered), 3), "p99_s": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3)}


def measure_generation(arguments: argparse.Namespace, work: Path) -> dict:
    """Generation latency on the demo model in the server, without and then with a training running."""
    from fastapi.testclient import TestClient

    from sd_server.app import create_app

    shutil.copytree(PROJECT_DIR / "models" / "demo", work / "models" / "demo")
    settings = Settings(
        _env_file=None, default_model="demo", models_dir=work / "models", output_dir=work / "output", data_dir=work / "data",
        rate_limit=None, read_rate_limit=None, save_images=False, training_slice_steps=arguments.slice_steps,
    )  # fmt: skip
    photos = [("images", (path.name, path.read_bytes(), "image/png")) for path in write_photos(work / "upload", 8, 256)]
    with TestClient(create_app(settings)) as client:
        latencies(client, argparse.Namespace(requests=2))  # warm-up: the model is loaded
        idle = latencies(client, arguments)
        fields = {"steps": "3000", "resolution": "256", "batch_size": str(arguments.batch_size), "activate": "false", "prior_loss_weight": "0"}
        training = client.post("/users/default/trainings", files=photos, data=fields).json()
        while client.get(training["links"]["self"]).json()["status"] != "training":
            time.sleep(0.2)
        busy = latencies(client, arguments)
        step = client.get(training["links"]["self"]).json()["progress"]["step"]
        client.post(training["links"]["cancel"])
    without, during = percentiles(idle), percentiles(busy)
    return {
        "without_training": without,
        "with_training": during,
        "training_steps_meanwhile": step,
        "p50_ratio": round(during["p50_s"] / without["p50_s"], 2),
        "p99_ratio": round(during["p99_s"] / without["p99_s"], 2),
    }


def measure_photos_to_model(model_dir: Path, arguments: argparse.Namespace, work: Path) -> dict:
    """Through the API, in the server: the seconds from uploading 10 photos to their LoRA being the user's model
    (the base loaded, the photos encoded, every step, the samples drawn), and peak memory."""
    from fastapi.testclient import TestClient

    from sd_server.app import create_app

    models = model_dir.parent if model_dir.parent == work else work / "photos-to-model"
    if models != model_dir.parent:  # the server stores the LoRA beside its base: never into the repository
        shutil.copytree(model_dir, models / model_dir.name)
    device = choose_device("auto", torch.cuda.is_available(), False)
    settings = Settings(  # its own data folder: nothing of the generation run's server resumes in it
        _env_file=None, default_model=model_dir.name, models_dir=models, output_dir=work / "photos-to-model-output",
        data_dir=work / "photos-to-model-data",
        rate_limit=None, read_rate_limit=None, save_images=False, training_slice_steps=25, training_sample_every=0,
        max_training_steps=max(3000, arguments.photos_to_model), training_min_photo_side=min(256, arguments.resolution),
    )  # fmt: skip
    photos = [("images", (path.name, path.read_bytes(), "image/png")) for path in write_photos(work / "photos-in", 10, arguments.resolution)]
    fields = {"steps": str(arguments.photos_to_model), "resolution": str(arguments.resolution), "batch_size": "1", "rank": str(arguments.rank),
              "class_word": "shape", "prior_loss_weight": "0"}  # fmt: skip
    with TestClient(create_app(settings)) as client:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        response = client.post("/users/default/trainings", files=photos, data=fields)
        assert response.status_code == 202, response.text
        training = response.json()
        while (training := client.get(f"/trainings/{training['training_id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.05)
        active = training["model"] is not None and client.get("/users/default/model").json()["model"] == training["model"]
        seconds = time.perf_counter() - started
    return {
        "device": device, "photos": 10, "steps": arguments.photos_to_model, "resolution": arguments.resolution, "status": training["status"],
        "lora_active": active, "seconds": round(seconds, 2), "peak_memory_bytes": peak_memory_bytes(device),
    }  # fmt: skip


def main() -> None:
    """Parse the arguments, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="train on a full-size SD1.5 with random weights")
    parser.add_argument("--model", type=Path, default=PROJECT_DIR / "models" / "demo", help="the model folder (default: the demo model)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="generations timed with and without a training")
    parser.add_argument("--slice-steps", type=int, default=5, help="SD_TRAINING_SLICE_STEPS")
    parser.add_argument("--photos-to-model", type=int, default=0, metavar="STEPS",
                        help="also time 10 photos in to LoRA active through the API, training STEPS steps")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if arguments.sd15:  # built in a process of its own, so that this one's peak memory is the training's
            model_dir = work / "sd15"
            subprocess.run([sys.executable, str(Path(__file__).parent / "sd15_random.py"), str(model_dir)], check=True)
        else:
            model_dir = arguments.model
        steps = measure_steps(model_dir, arguments, work)
        print("| model | device | resolution | batch | setup s | s/step | peak memory MiB |\n|---|---|---|---|---|---|---|")
        print(f"| {'sd15 (random)' if arguments.sd15 else model_dir.name} | {steps['device']} | {arguments.resolution} | {arguments.batch_size} "
              f"| {steps['setup_s']} | {steps['seconds_per_step']} | {steps['peak_memory_bytes'] / 2**20:.0f} |")  # fmt: skip
        generation = measure_generation(arguments, work) if arguments.requests else {}
        if generation:
            print("\n| generation (demo, 256x256, 20 steps) | p50 s | p99 s |\n|---|---|---|")
            for name in ("without_training", "with_training"):
                print(f"| {name.replace('_', ' ')} | {generation[name]['p50_s']} | {generation[name]['p99_s']} |")
            print(f"| with / without | {generation['p50_ratio']} | {generation['p99_ratio']} |")
            print(f"\n(training steps run meanwhile: {generation['training_steps_meanwhile']}, slices of {arguments.slice_steps})")
        end_to_end = measure_photos_to_model(model_dir, arguments, work) if arguments.photos_to_model else {}
        if end_to_end:
            print("\n| photos in to LoRA active (API) | device | steps | resolution | seconds | peak memory MiB |\n|---|---|---|---|---|---|")
            print(f"| {end_to_end['status']}, active: {end_to_end['lora_active']} | {end_to_end['device']} | {end_to_end['steps']} "
                  f"| {end_to_end['resolution']} | {end_to_end['seconds']} | {end_to_end['peak_memory_bytes'] / 2**20:.0f} |")  # fmt: skip
    if arguments.json:
        arguments.json.write_text(json.dumps({"training": steps, "generation": generation, "photos_to_model": end_to_end}, indent=2))


if __name__ == "__main__":
    main()
