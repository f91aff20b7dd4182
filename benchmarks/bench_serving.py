"""Serving benchmark: the engine's own loop, this service and a minimal baseline server, in one run.

Rows, each with images/s, latency p50/p99 and the mean batch: the raw loop (no HTTP, no queue) on a process's main
thread, on a worker thread (where the server's device thread runs it), and on a worker thread with PNG encoding, at
the batch size and at batch 1; the service (``python main.py``) with batching off and on at each client count; and
``baseline_server.py`` (one shared pipeline, ``from_pipe`` per request, the default executor) at each client count.
Then seconds per training step: the trainer's own loop, and a training through the service's API. Every row runs in
fresh processes; the load comes from ``load_generator.py`` in its own process, which polls a light endpoint meanwhile
and reports its own CPU share. Prints the rows and the ratios the targets are about; ``--json`` writes them. With
``--engine local,ray`` the service's batching rows run on Ray Serve replicas too. ``--rounds N`` runs every row N
times, interleaved, and prints the medians: on a shared machine whose speed drifts over minutes, a ratio of rows
measured minutes apart is noisy, so each round's ratios are taken, then their median. Examples:

    .venv/bin/python benchmarks/bench_serving.py                        # demo model, 256x256, 20 steps, 32 requests
    .venv/bin/python benchmarks/bench_serving.py --rounds 3 --json benchmarks/results/serving-cpu.json
    .venv/bin/python benchmarks/bench_serving.py --sd15 --size 512 --steps 30 --requests 64 --clients 1,8,16
    .venv/bin/python benchmarks/bench_serving.py --engine local,ray --ray-layouts 1x2   # the Ray replicas' rows
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCHMARKS))

import load_generator  # noqa: E402
from load_generator import free_port, percentile  # noqa: E402, F401  (other benchmarks import percentile from here)

from config import Settings  # noqa: E402
from model_service import ModelService  # noqa: E402

DEMO_MODEL_DIR = ROOT / "models" / "demo"


def request_body(index: int, arguments: argparse.Namespace) -> dict:
    """Request ``index`` of the run: same shape for all, so they can be batched; its own prompt and seed."""
    return load_generator.request_body(index, arguments.steps, arguments.size)


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
    return launch(["main.py"], port, environment)


def launch(command: list[str], port: int, environment: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start the Python server ``command`` listening on ``port``; the process and its URL once healthy."""
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url)
    return process, url


async def run_load(url: str, arguments: argparse.Namespace, body: Callable[[int], dict] | None = None, warm_ups: int = 1) -> dict:
    """The load of the other serving benchmarks, in this process: ``--requests`` from ``--concurrency`` clients."""
    body = body or (lambda index: request_body(index, arguments))
    return await load_generator.run_load(url, arguments.requests, arguments.concurrency, body, warm_ups)


@contextmanager
def running(server: tuple[subprocess.Popen, str]) -> Iterator[str]:
    """The URL of a server that ``start_server`` or ``launch`` started; it stops on leaving."""
    process, url = server
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_part(command: list[str]) -> str:
    """Run a benchmark part as its own process; what it printed."""
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def run_json(command: list[str]) -> dict:
    """Run a benchmark part as its own process; the JSON object it prints last."""
    return json.loads(run_part(command).strip().splitlines()[-1])


def load(url: str, clients: int, arguments: argparse.Namespace, light_path: str) -> dict:
    """The load generator, in its own process, against ``url``."""
    return run_json(
        [str(BENCHMARKS / "load_generator.py"), "--url", url, "--requests", str(arguments.requests), "--clients", str(clients),
         "--steps", str(arguments.steps), "--size", str(arguments.size), "--light-path", light_path]
    )  # fmt: skip


def raw_row(model: str, thread: str, png: bool, batch: int, arguments: argparse.Namespace) -> dict:
    """The raw loop in a fresh process."""
    command = [str(BENCHMARKS / "raw_loop.py"), "--model", model, "--thread", thread, "--batch", str(batch),
               "--requests", str(arguments.requests), "--steps", str(arguments.steps), "--size", str(arguments.size)]  # fmt: skip
    figures = run_json(command + (["--png"] if png else []))
    return {"row": f"raw loop, {thread} thread{' + PNG' if png else ''}", "batch": batch, "clients": None, **figures}


def wait_healthy(process: subprocess.Popen, url: str) -> None:
    """Wait until ``url``/health answers 200 (at most 10 minutes: a model loads)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server at {url} did not start (exit code {process.poll()})")


def service_rows(model: str, batch: int, arguments: argparse.Namespace, extra: dict[str, str] | None = None, label: str = "service") -> list[dict]:
    """The service with SD_MAX_BATCH_SIZE ``batch`` (and the ``extra`` variables), loaded at each client count."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as data_dir:
        with running(start_server(model, batch, arguments, Path(data_dir), extra)) as url:
            for clients in arguments.client_counts:
                figures = load(url, clients, arguments, "/health/ready")
                rows.append({"row": f"{label}, batching {'on' if batch > 1 else 'off'}", "batch": batch, "clients": clients, **figures})
    return rows


def baseline_rows(model: str, arguments: argparse.Namespace) -> list[dict]:
    """The minimal baseline server, loaded at each client count."""
    port = free_port()
    with running(launch([str(BENCHMARKS / "baseline_server.py"), "--model", model, "--port", str(port)], port)) as url:
        return [{"row": "baseline server", "batch": 1, "clients": clients, **load(url, clients, arguments, "/health")} for clients in arguments.client_counts]


def training_rows(model: str, arguments: argparse.Namespace) -> list[dict]:
    """Seconds per training step: the trainer's own loop in a fresh process (``bench_training.py``), then a training
    through the API of a fresh service with nothing else queued (its device thread runs it in slices)."""
    with tempfile.TemporaryDirectory(prefix="bench-training-") as folder:
        figures = Path(folder) / "raw.json"
        run_part([str(BENCHMARKS / "bench_training.py"), "--model", model, "--steps", str(arguments.training_steps),
                  "--resolution", str(arguments.size), "--requests", "0", "--json", str(figures)])  # fmt: skip
        raw = json.loads(figures.read_text())["training"]["seconds_per_step"]
        with running(start_server(model, 1, arguments, Path(folder))) as url:
            served = served_seconds_per_step(url, Path(folder) / "photos", arguments)
    return [{"row": "training, raw trainer (main thread)", "s_per_step": raw}, {"row": "training, the service's device thread", "s_per_step": served}]


def served_seconds_per_step(url: str, photos: Path, arguments: argparse.Namespace) -> float:
    """Train through the API, following its events (no polling, which would cost the server CPU); seconds per step
    from the first slice's progress event (the setup left out) to the last's."""
    from bench_training import write_photos

    files = [("images", (path.name, path.read_bytes(), "image/png")) for path in write_photos(photos, 8, arguments.size)]
    # The raw trainer's settings: no prior preservation, and colour blocks are no person's photos.
    fields = {"steps": str(arguments.training_steps), "resolution": str(arguments.size), "activate": "false", "class_word": "shape",
              "prior_loss_weight": "0"}  # fmt: skip
    progress: list[tuple[int, float]] = []  # (step, when its event came)
    with httpx.Client(base_url=url, timeout=600) as client:
        created = client.post("/users/default/trainings", files=files, data=fields)
        created.raise_for_status()
        with client.stream("GET", created.json()["links"]["events"]) as events:
            event = ""
            for line in events.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "progress":
                    progress.append((json.loads(line.removeprefix("data: "))["step"], time.perf_counter()))
    if event != "succeeded" or len(progress) < 2:
        raise SystemExit(f"the benchmark's training ended '{event}' after {len(progress)} progress events (--training-steps {arguments.training_steps})")
    (first_step, first_at), (last_step, last_at) = progress[0], progress[-1]
    return round((last_at - first_at) / (last_step - first_step), 4)


def ratios(rows: list[dict], batch: int, arguments: argparse.Namespace) -> dict:
    """What the targets compare: served/raw (worker thread, PNG, batching on), service/baseline per client count,
    and batching off at 1 client against the raw loop at batch 1."""

    def find(row: str, batch_size: int, clients: int | None) -> dict:
        return next(r for r in rows if r["row"] == row and r["batch"] == batch_size and r["clients"] == clients)

    raw = find("raw loop, worker thread + PNG", batch, None)["images_per_s"]
    raw_one = find("raw loop, worker thread + PNG", 1, None)["images_per_s"]
    figures: dict = {}
    for clients in arguments.client_counts:
        served = find("service, batching on" if batch > 1 else "service, batching off", batch, clients)["images_per_s"]
        figures[f"served_over_raw_{clients}_clients"] = round(served / raw, 3)
        figures[f"service_over_baseline_{clients}_clients"] = round(served / find("baseline server", 1, clients)["images_per_s"], 3)
    if 1 in arguments.client_counts:
        figures["batching_off_1_client_over_raw_batch_1"] = round(find("service, batching off", 1, 1)["images_per_s"] / raw_one, 3)
    training = {row["row"]: row["s_per_step"] for row in rows if "s_per_step" in row}
    if training:  # a speed ratio, as the others: raw seconds per step over served
        figures["training_served_over_raw"] = round(training["training, raw trainer (main thread)"] / training["training, the service's device thread"], 3)
    return figures


def print_rows(rows: list[dict], figures: dict) -> None:
    """The rows as one Markdown table, then the ratios."""
    print("\n| row | batch | clients | images/s | p50 s | p99 s | mean batch | failed requests | light endpoint p99 ms | load generator CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in (row for row in rows if "images_per_s" in row):
        light = f"{row['health_p99_s'] * 1000:.1f}" if "health_p99_s" in row else ""
        cpu = f"{row['load_cpu_share']:.1%}" if "load_cpu_share" in row else ""
        print(
            f"| {row['row']} | {row['batch']} | {row['clients'] or ''} | {row['images_per_s']:.3f} | {row['latency_p50_s']:.3f} "
            f"| {row['latency_p99_s']:.3f} | {row['mean_batch_size']:.2f} | {row.get('failed_requests', '')} | {light} | {cpu} |"
        )
    training = [row for row in rows if "s_per_step" in row]
    if training:
        print("\n| training | s/step |\n|---|---|")
        for row in training:
            print(f"| {row['row']} | {row['s_per_step']:.4f} |")
    print()
    for name, value in figures.items():
        print(f"{name}: {value:.3f}")


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


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every serving benchmark: the model, and the load (requests, clients, steps, size)."""
    parser.add_argument("--model", help="hub id or folder; default: the demo model")
    parser.add_argument("--sd15", action="store_true", help="serve a full-size SD1.5 with random weights")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)


def main() -> None:
    """Parse arguments, run every row, print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--clients", default="1,4,8", help="client counts of the served rows, comma-separated")
    parser.add_argument("--max-batch-size", type=int, default=None, help="the batching rows' SD_MAX_BATCH_SIZE; default: the server's")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--engine", default="local", help="local, or local,ray: the batching rows on Ray Serve too")
    parser.add_argument("--ray-layouts", default="1x2", help="Ray replicas x CPUs per replica, comma-separated")
    parser.add_argument("--training-steps", type=int, default=40, help="steps of the training rows (0: no training rows)")
    parser.add_argument("--rounds", type=int, default=1, help="run every row this many times, interleaved; medians")
    arguments = parser.parse_args()
    arguments.client_counts = [int(count) for count in arguments.clients.split(",")]

    model = resolve_model(arguments)
    settings = Settings(_env_file=None)
    batch = arguments.max_batch_size or settings.max_batch_size or ModelService(settings).default_max_batch_size
    rounds = [one_round(model, batch, arguments) for _ in range(arguments.rounds)]
    rows = [median_row(same) for same in zip(*rounds)]
    per_round = [ratios(rows_of_round, batch, arguments) for rows_of_round in rounds]
    figures = {name: round(statistics.median(each[name] for each in per_round), 3) for name in per_round[0]}
    print(f"\nmodel={model} size={arguments.size} steps={arguments.steps} requests={arguments.requests} batch={batch} rounds={arguments.rounds} "
          f"device={next(row['device'] for row in rows if row.get('device'))}")  # fmt: skip
    print_rows(rows, figures)
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps({"model": model, "size": arguments.size, "steps": arguments.steps, "requests": arguments.requests,
                                              "batch": batch, "rows": rows, "ratios": figures, "rounds": rounds}, indent=2) + "\n")  # fmt: skip


def one_round(model: str, batch: int, arguments: argparse.Namespace) -> list[dict]:
    """Every row once, in order: the raw loops, the service, the baseline, the Ray rows and the training rows."""
    rows = [raw_row(model, thread, png, batch, arguments) for thread, png in (("main", False), ("worker", False), ("worker", True))]
    rows.append(raw_row(model, "worker", True, 1, arguments))
    rows += service_rows(model, 1, arguments) + service_rows(model, batch, arguments)
    rows += baseline_rows(model, arguments)
    if "ray" in arguments.engine.split(","):
        for replicas, cpus in ray_layouts(arguments.ray_layouts):
            extra = {"SD_ENGINE": "ray", "SD_RAY_REPLICAS": str(replicas), "SD_RAY_NUM_CPUS": str(cpus), "SD_RAY_ADDRESS": ""}
            rows += service_rows(model, batch, arguments, extra, label=f"service on Ray, {replicas} replica(s) x {cpus:g} CPU")
    if arguments.training_steps:
        rows += training_rows(model, arguments)
    return rows


def median_row(same: tuple[dict, ...]) -> dict:
    """One row of several rounds: the median of each figure, the failed requests of all."""
    merged = {key: round(statistics.median(row[key] for row in same), 4) if isinstance(value, float) else value for key, value in same[0].items()}
    if "failed_requests" in merged:
        merged["failed_requests"] = sum(row["failed_requests"] for row in same)
    return merged


def ray_layouts(text: str) -> list[tuple[int, float]]:
    """``1x2,2x1`` as [(replicas, CPUs per replica), ...]."""
    return [(int(replicas), float(cpus)) for replicas, cpus in (layout.split("x") for layout in text.split(","))]


if __name__ == "__main__":
    main()
