"""Serving benchmark: N requests from C concurrent clients against the real server, batching on and off.

Prints images/s, latency p50/p95/p99, /health p99 under the load and the mean batch size for each mode,
and the raw pipeline loop without HTTP as the ceiling. With ``--engine local,ray`` it also serves the same load
with SD_ENGINE=ray (Ray Serve replicas on a local Ray; pip install -r requirements-ray.txt), for each replica
layout of ``--ray-layouts``, beside the local engine: images/s and their ratio to local, latency, and the time from
starting the server to its first image. Examples:

    .venv/bin/python benchmarks/bench_serving.py                       # demo model, CPU-sized defaults
    .venv/bin/python benchmarks/bench_serving.py --sd15 --size 512 --steps 30 --requests 64 --concurrency 16
    .venv/bin/python benchmarks/bench_serving.py --model models/my-dreambooth --json figures.json
    .venv/bin/python benchmarks/bench_serving.py --engine local,ray --ray-layouts 1x2,2x1   # the cost of the Ray hop
"""

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from model_service import ModelService  # noqa: E402
from sd_server.domain.models import CheckpointModel  # noqa: E402
from sd_server.engine.interface import BatchItem, BatchKey  # noqa: E402

DEMO_MODEL_DIR = ROOT / "models" / "demo"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def request_body(index: int, arguments: argparse.Namespace) -> dict:
    """Request ``index`` of the run: same shape for all, so they can be batched; its own prompt and seed."""
    return {
        "prompt": f"a photo of sks person, variation {index}",
        "seed": index,
        "num_inference_steps": arguments.steps,
        "width": arguments.size,
        "height": arguments.size,
    }


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    model: str, max_batch_size: int, arguments: argparse.Namespace, data_dir: Path, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``python main.py`` serving ``model`` with SD_MAX_BATCH_SIZE (and the ``extra`` variables), its database and
    images in ``data_dir`` (never the default folders: their keys would refuse the benchmark, and its jobs would fill
    their history); returns the process and its URL once healthy."""
    port = free_port()
    environment = {
        **os.environ,
        "SD_DEFAULT_MODEL": model,
        "SD_HOST": "127.0.0.1",
        "SD_PORT": str(port),
        "SD_DATA_DIR": str(data_dir),
        "SD_DATABASE_URL": "",
        "SD_OUTPUT_DIR": str(data_dir / "output"),
        "SD_AUTH": "off",
        "SD_RATE_LIMIT": "",
        "SD_SAVE_IMAGES": "false",
        "SD_MAX_QUEUE": str(max(64, arguments.requests * 2)),
        "SD_MAX_BATCH_SIZE": str(max_batch_size),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        **(extra or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "main.py"], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start")


async def run_load(url: str, arguments: argparse.Namespace, body: Callable[[int], dict] | None = None, warm_ups: int = 1) -> dict:
    """Send the requests (``body(index)``, default ``request_body``) from C clients while polling /health, after
    ``warm_ups`` requests one by one (they load the models); returns the figures of this run."""
    body = body or (lambda index: request_body(index, arguments))
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        first_started = time.perf_counter()
        for index in range(arguments.requests, arguments.requests + warm_ups):
            (await client.post("/generate/image", json=body(index))).raise_for_status()
        first_image_at = time.perf_counter()
        before = (await client.get("/health")).json()
        indexes = iter(range(arguments.requests))
        latencies: list[float] = []
        health_latencies: list[float] = []
        loading = asyncio.Event()

        async def client_loop() -> None:
            for index in indexes:
                started = time.perf_counter()
                (await client.post("/generate/image", json=body(index))).raise_for_status()
                latencies.append(time.perf_counter() - started)

        async def poll_health() -> None:
            while not loading.is_set():
                started = time.perf_counter()
                (await client.get("/health")).raise_for_status()
                health_latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_health())
        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(arguments.concurrency)))
        elapsed = time.perf_counter() - started
        loading.set()
        await poller
        after = (await client.get("/health")).json()
    batches = after["queue"]["batches_run"] - before["queue"]["batches_run"]
    images = after["queue"]["mean_batch_size"] * after["queue"]["batches_run"] - before["queue"]["mean_batch_size"] * before["queue"]["batches_run"]
    return {
        "images_per_s": round(arguments.requests / elapsed, 3),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "health_p99_s": round(percentile(health_latencies, 99), 4),
        "mean_batch_size": round(images / batches, 2) if batches else 0.0,
        "first_request_s": round(first_image_at - first_started, 3),
        "first_image_at": first_image_at,
        "device": after["device"],
    }


def serve_and_measure(model: str, max_batch_size: int, arguments: argparse.Namespace, extra: dict[str, str] | None = None) -> dict:
    """One mode: start the server on a fresh data folder (with the ``extra`` variables), load it, stop it; the
    figures, with the seconds from starting the process to its first image."""
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as data_dir:
        started = time.perf_counter()
        process, url = start_server(model, max_batch_size, arguments, Path(data_dir), extra)
        try:
            figures = asyncio.run(run_load(url, arguments))
        finally:
            process.terminate()
            process.wait(timeout=60)
    figures["start_to_first_image_s"] = round(figures.pop("first_image_at") - started, 2)
    return figures


def ray_layouts(text: str) -> list[tuple[int, float]]:
    """``1x2,2x1`` as [(replicas, CPUs per replica), ...]."""
    return [(int(replicas), float(cpus)) for replicas, cpus in (layout.split("x") for layout in text.split(","))]


def compare_engines(model: str, max_batch_size: int, arguments: argparse.Namespace, local: dict) -> list[dict]:
    """The batching load on the local engine (``local``, measured already) and on Ray with each layout: one row
    each, images/s relative to local."""
    rows = [{"engine": "local", "layout": "1 process", **local}]
    for replicas, cpus in ray_layouts(arguments.ray_layouts):
        extra = {"SD_ENGINE": "ray", "SD_RAY_REPLICAS": str(replicas), "SD_RAY_NUM_CPUS": str(cpus), "SD_RAY_ADDRESS": ""}
        figures = serve_and_measure(model, max_batch_size, arguments, extra)
        rows.append({"engine": "ray", "layout": f"{replicas} replica(s) x {cpus:g} CPU", **figures})
    for row in rows:
        row["vs_local"] = round(row["images_per_s"] / local["images_per_s"], 3)
    return rows


def print_engines(rows: list[dict]) -> None:
    """The engines side by side, as a Markdown table."""
    print("\n| engine | layout | images/s | vs local | p50 s | p95 s | health p99 ms | mean batch | first request s | start to first image s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['engine']} | {row['layout']} | {row['images_per_s']:.3f} | {row['vs_local']:.2f} | {row['latency_p50_s']:.3f} "
            f"| {row['latency_p95_s']:.3f} | {row['health_p99_s'] * 1000:.1f} | {row['mean_batch_size']:.2f} | {row['first_request_s']:.2f} "
            f"| {row['start_to_first_image_s']:.2f} |"
        )


def raw_images_per_s(model: str, batch_size: int, arguments: argparse.Namespace) -> float:
    """The pipeline alone, in this process, no HTTP and no queue: images/s over the same requests."""
    service = ModelService(Settings(_env_file=None, default_model=model))
    checkpoint = CheckpointModel(source=model)
    key = BatchKey(model, arguments.size, arguments.size, arguments.steps, 7.5, None)
    service.run_batch(key, [BatchItem(checkpoint, "warm-up", None, 0, 1)], lambda step, total: None, lambda: False)  # load, warm up
    started = time.perf_counter()
    for first in range(0, arguments.requests, batch_size):
        indexes = range(first, min(first + batch_size, arguments.requests))
        items = [BatchItem(checkpoint, request_body(index, arguments)["prompt"], None, index, 1) for index in indexes]
        service.run_batch(key, items, lambda step, total: None, lambda: False)
    elapsed = time.perf_counter() - started
    service.unload()
    return round(arguments.requests / elapsed, 3)


def resolve_model(arguments: argparse.Namespace) -> str:
    """The model to serve: --model, the SD1.5-sized random pipeline (--sd15, built if missing), or the demo model."""
    if arguments.model:
        return arguments.model
    if arguments.sd15:
        from sd15_random import DEFAULT_DIR, save_sd15_random

        if not (DEFAULT_DIR / "model_index.json").exists():
            save_sd15_random(DEFAULT_DIR)
        return str(DEFAULT_DIR)
    return str(DEMO_MODEL_DIR)


def print_table(figures: dict) -> None:
    """The figures as one table."""
    print(f"\nmodel={figures['model']} device={figures['device']} requests={figures['requests']} concurrency={figures['concurrency']}")
    print(f"{'mode':<14}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}{'p99 s':>9}{'health p99 ms':>15}{'mean batch':>12}")
    for mode in ("no_batching", "batching"):
        row = figures[mode]
        print(
            f"{mode:<14}{row['images_per_s']:>10.3f}{row['latency_p50_s']:>9.3f}{row['latency_p95_s']:>9.3f}"
            f"{row['latency_p99_s']:>9.3f}{row['health_p99_s'] * 1000:>15.1f}{row['mean_batch_size']:>12.2f}"
        )
    raw = figures["raw_images_per_s"]
    print(f"{'raw pipeline':<14}{raw:>10.3f}   (batch {figures['max_batch_size']}, no HTTP, no queue: the ceiling)")
    print(f"server / raw: batching {figures['batching']['images_per_s'] / raw:.0%}, no batching {figures['no_batching']['images_per_s'] / raw:.0%}")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every serving benchmark: the model, and the load (requests, clients, steps, size)."""
    parser.add_argument("--model", help="hub id or folder; default: the demo model")
    parser.add_argument("--sd15", action="store_true", help="serve a full-size SD1.5 with random weights")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)


def main() -> None:
    """Parse arguments, run the raw loop and both serving modes, print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--max-batch-size", type=int, default=None, help="for the batching mode; default: the server's")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--engine", default="local", help="local, or local,ray: the batching load on Ray Serve too")
    parser.add_argument("--ray-layouts", default="1x2,2x1", help="Ray replicas x CPUs per replica, comma-separated")
    arguments = parser.parse_args()

    model = resolve_model(arguments)
    engine = ModelService(Settings(_env_file=None))
    max_batch_size = arguments.max_batch_size or Settings(_env_file=None).max_batch_size or engine.default_max_batch_size
    figures = {"model": model, "requests": arguments.requests, "concurrency": arguments.concurrency, "max_batch_size": max_batch_size}
    figures["raw_images_per_s"] = raw_images_per_s(model, max_batch_size, arguments)
    figures["no_batching"] = serve_and_measure(model, 1, arguments)
    figures["batching"] = serve_and_measure(model, max_batch_size, arguments)
    figures["device"] = figures["batching"].pop("device")
    figures["no_batching"].pop("device")
    print_table(figures)
    if "ray" in arguments.engine.split(","):
        figures["engines"] = compare_engines(model, max_batch_size, arguments, figures["batching"])
        print_engines(figures["engines"])
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
