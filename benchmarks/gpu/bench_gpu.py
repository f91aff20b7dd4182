"""SD1.5 through this service on a GPU, against the bare pipeline, with SD_COMPILE off and on: one JSON object.

Run it with ``benchmarks/gpu/run.sh``, which installs the wheels a bare GPU machine lacks first (README there). Parts,
each in fresh processes, in this order; the JSON is rewritten after each one, so a run cut short keeps what it had:

- ``raw``: the bare diffusers pipeline in-process (this service's load options: fp16, SDPA, channels_last; with
  compile, its compiled UNet): batch 1 at ``--steps-single`` steps (seconds end to end, it/s), and images/s at each of
  ``--batches`` at ``--steps``; peak device memory; on CUDA, uncompiled, the host syncs of the service's engine on one
  image (CUDA's sync debug mode), which a step should not have.
- ``served``: ``main.py`` on the same folder, through ``POST /generate/image``: start to ready, the first request,
  batch 1 end to end, images/s with as many clients as each batch holds, then one LoRA for every client against
  ``--lora-users`` distinct LoRAs in a batch; peak device memory and compile figures from ``/health``, and the
  reasons of every recompile (``TORCH_LOGS=recompiles``).

Both parts run with SD_COMPILE on, then off (``--compile off`` or ``on`` runs one; compiled first, as the targets are
about it: a run that reaches its deadline skips uncompiled parts); compiled for ``--compile-batches``
(a batch pads up to the next of them; past the largest it runs uncompiled), with one kernel cache for both parts. Then the ratios the issue's
targets are about. ``--smoke`` runs the same code on the demo model at a size a CPU affords (CI runs it).

    benchmarks/gpu/run.sh --json benchmarks/results/gpu-h200.json     # SD1.5 shapes, random weights, 512x512
    benchmarks/gpu/run.sh --smoke --json /tmp/gpu-smoke.json          # the demo model on CPU, a minute or two
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCHMARKS))

import load_generator  # noqa: E402

PROMPT = "a photo of sks person, portrait, {index}"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's shape: the full GPU run by default, ``--smoke`` for CI's CPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the demo model, 2 steps, batches 1 and 2, 2 LoRA users")
    parser.add_argument("--model", help="a pipeline folder; default: SD1.5's shapes with random weights (the demo model with --smoke)")
    parser.add_argument("--size", type=int, help="image side; default 512 (256 with --smoke)")
    parser.add_argument("--steps-single", type=int, help="steps of the single-image rows; default 50 (2 with --smoke)")
    parser.add_argument("--steps", type=int, help="steps of the batch rows; default 30 (2 with --smoke)")
    parser.add_argument("--batches", help="comma-separated batch sizes; default 8,16,32 (2 with --smoke)")
    parser.add_argument("--lora-users", type=int, help="distinct LoRAs in the LoRA rows, and their batch; default 16 (2 with --smoke)")
    parser.add_argument("--compile-batches", help="SD_COMPILE_BATCH_SIZES of the compiled rows; default 1,16 (1,2 with --smoke)")
    parser.add_argument("--repeats", type=int, help="timed runs of each raw and batch-1 row (median); default 3 (1 with --smoke)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--compile-mode", default="default", help="SD_COMPILE_MODE of the compiled rows (reduce-overhead: CUDA graphs)")
    parser.add_argument("--deadline-s", type=float, help="skip a part that would start after this many seconds; default 480 (none with --smoke)")
    parser.add_argument("--json", type=Path, help="write the figures here (after every part)")
    parser.add_argument("--part", choices=("raw",), help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    smoke = arguments.smoke
    defaults = {"size": 256 if smoke else 512, "steps_single": 2 if smoke else 50, "steps": 2 if smoke else 30,
                "batches": "2" if smoke else "8,16,32", "lora_users": 2 if smoke else 16, "repeats": 1 if smoke else 2,
                "compile_batches": "1,2" if smoke else "1,16",
                "deadline_s": float("inf") if smoke else 480}  # fmt: skip
    for name, value in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    arguments.batch_sizes = [int(size) for size in str(arguments.batches).split(",")]
    arguments.compile_batch_sizes = [int(size) for size in str(arguments.compile_batches).split(",")]
    return arguments


def prepare_models(folder: Path, arguments: argparse.Namespace) -> Path:
    """``folder`` with the model as ``bench`` (SD1.5 shapes with random weights, the demo model, or ``--model``) and
    a LoRA per LoRA user, rank 8 on the attention projections."""
    from diffusers import UNet2DConditionModel
    from sd15_random import save_sd15_random

    from sd_server.demo.random_pipeline import save_random_lora

    model = folder / "bench"
    if arguments.model or arguments.smoke:
        shutil.copytree(arguments.model or ROOT / "models" / "demo", model)
    else:
        save_sd15_random(model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    for index in range(arguments.lora_users):
        save_random_lora(folder / "loras" / f"user-{index}.safetensors", seed=index, rank=8, unet=unet, spread=0.02)
    return model


def user_models(arguments: argparse.Namespace) -> dict[str, dict]:
    """SD_USER_MODELS for the LoRA users: ``lora-i`` runs ``loras/user-i`` on ``bench``."""
    return {f"lora-{index}": {"kind": "lora", "base": "bench", "source": f"loras/user-{index}.safetensors"} for index in range(arguments.lora_users)}


def compile_settings(arguments: argparse.Namespace, cache_dir: Path) -> dict[str, str]:
    """SD_COMPILE's variables: compiled for the batch sizes of the rows at the run's image size."""
    return {
        "SD_COMPILE": "true",
        "SD_COMPILE_MODE": arguments.compile_mode,
        "SD_COMPILE_BATCH_SIZES": json.dumps(arguments.compile_batch_sizes),
        "SD_COMPILE_SIZES": json.dumps([f"{arguments.size}x{arguments.size}"]),
        "SD_COMPILE_CACHE_DIR": str(cache_dir),
    }


def raw_part(arguments: argparse.Namespace) -> dict:
    """The bare pipeline in this process: load, (compile), batch 1, each batch size; its figures."""
    import torch
    from bench_lora_batching import synchronize
    from diffusers import StableDiffusionPipeline

    from config import Settings
    from sd_server.engine.compiled import PipelineCompiler
    from sd_server.engine.devices import choose_device, choose_dtype, configure_memory_format

    settings = Settings(_env_file=None)  # SD_* of the environment: compile_settings' when --compiled
    device = choose_device("auto", torch.cuda.is_available(), False)
    started = time.perf_counter()
    pipeline = StableDiffusionPipeline.from_pretrained(arguments.model, dtype=choose_dtype("auto", device), safety_checker=None)
    configure_memory_format(pipeline, device, settings)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    figures: dict = {"load_s": round(time.perf_counter() - started, 2)}
    if arguments.compiled:
        compiler = PipelineCompiler(settings, max(arguments.compile_batch_sizes))
        started = time.perf_counter()
        compiler.warm(pipeline)
        figures["compile_s"] = round(time.perf_counter() - started, 2)

    def seconds(batch: int, steps: int) -> float:
        prompts = [PROMPT.format(index=index) for index in range(batch)]
        generators = [torch.Generator("cpu").manual_seed(index) for index in range(batch)]
        synchronize(device)
        begun = time.perf_counter()
        pipeline(prompts, num_inference_steps=steps, width=arguments.size, height=arguments.size, generator=generators)
        synchronize(device)
        return time.perf_counter() - begun

    seconds(1, 2)  # first call: kernels chosen, memory pools grown
    single = statistics.median(seconds(1, arguments.steps_single) for _ in range(arguments.repeats))
    figures["single"] = {"steps": arguments.steps_single, "seconds": round(single, 3), "it_per_s": round(arguments.steps_single / single, 2)}
    for batch in arguments.batch_sizes:
        seconds(batch, 2)
        elapsed = statistics.median(seconds(batch, arguments.steps) for _ in range(arguments.repeats))
        figures[f"batch_{batch}"] = {"steps": arguments.steps, "seconds": round(elapsed, 3), "images_per_s": round(batch / elapsed, 3)}
    figures["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    if not arguments.compiled:
        figures["engine_host_syncs"] = engine_host_syncs(arguments)
    return figures


def engine_host_syncs(arguments: argparse.Namespace, steps: int = 10) -> dict | None:
    """The service's engine (step callback, cancel checks, previews every 5 steps and all) on one image: the
    device-to-host waits CUDA's sync debug mode reports, in all and per step; None off CUDA, where there is nothing to
    wait for."""
    import warnings

    import torch

    from config import Settings
    from model_service import ModelService
    from sd_server.domain.models import CheckpointModel
    from sd_server.engine.interface import BatchItem, BatchKey

    if not torch.cuda.is_available():
        return None
    engine = ModelService(Settings(_env_file=None, default_model=arguments.model, preview_every=5))
    key = BatchKey(arguments.model, arguments.size, arguments.size, steps, 7.5, None)
    items = [BatchItem(CheckpointModel(source=arguments.model), PROMPT.format(index=0), None, 0, 1)]
    engine.run_batch(key, items, lambda step, total, previews=None: None, lambda: False)  # load and warm up
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.run_batch(key, items, lambda step, total, previews=None: None, lambda: False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(warning.message).splitlines()[0] for warning in caught if "synchroniz" in str(warning.message)]
    return {"steps": steps, "syncs": len(syncs), "per_step": round(len(syncs) / steps, 2), "first": syncs[:3]}


def run_raw(arguments: argparse.Namespace, model: Path, environment: dict[str, str], compiled: bool) -> dict:
    """``raw_part`` in a fresh process."""
    command = [sys.executable, __file__, "--part", "raw", "--model", str(model), "--size", str(arguments.size),
               "--steps-single", str(arguments.steps_single), "--steps", str(arguments.steps), "--batches", arguments.batches,
               "--repeats", str(arguments.repeats), "--compile-batches", arguments.compile_batches] + (["--compiled"] if compiled else [])  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the raw part failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_server(models_dir: Path, data_dir: Path, arguments: argparse.Namespace, extra: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    """``main.py`` serving ``bench`` and the LoRA users; the process, its URL, and seconds from start to ready."""
    port = load_generator.free_port()
    environment = {
        **os.environ,
        "SD_DEFAULT_MODEL": "bench", "SD_MODELS_DIR": str(models_dir), "SD_USER_MODELS": json.dumps(user_models(arguments)),
        "SD_HOST": "127.0.0.1", "SD_PORT": str(port), "SD_DATA_DIR": str(data_dir), "SD_DATABASE_URL": "",
        "SD_OUTPUT_DIR": str(data_dir / "output"), "SD_AUTH": "off", "SD_RATE_LIMIT": "", "SD_READ_RATE_LIMIT": "",
        "SD_SAVE_IMAGES": "false", "SD_MAX_BATCH_SIZE": str(max(*arguments.batch_sizes, arguments.lora_users)), "SD_MAX_QUEUE": "256",
        "SD_MAX_ACTIVE_JOBS_PER_USER": "256", "SD_PREVIEW_EVERY": "0", "HF_HUB_OFFLINE": "1", "TORCH_LOGS": "recompiles", **extra,
    }  # fmt: skip
    started = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "server.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a cold compile of every batch size
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not get ready (exit code {process.poll()}): {(data_dir / 'server.log').read_text()[-3000:]}")


def body(index: int, steps: int, size: int, user: str | None = None) -> dict:
    """Request ``index``: its own prompt and seed, the run's shape."""
    return {**load_generator.request_body(index, steps, size), **({"user_id": user} if user else {})}


def served_part(arguments: argparse.Namespace, models_dir: Path, data_dir: Path, extra: dict[str, str]) -> dict:
    """The service: start, first request, batch 1, each batch size, then one LoRA against distinct LoRAs."""
    process, url, ready_s = start_server(models_dir, data_dir, arguments, extra)
    try:
        figures: dict = {"start_to_ready_s": round(ready_s, 2)}
        with httpx.Client(base_url=url, timeout=3600) as client:
            started = time.perf_counter()
            client.post("/generate/image", json=body(10_000, arguments.steps_single, arguments.size)).raise_for_status()
            figures["first_request_s"] = round(time.perf_counter() - started, 3)
            single = []
            for index in range(arguments.repeats):
                started = time.perf_counter()
                client.post("/generate/image", json=body(index, arguments.steps_single, arguments.size)).raise_for_status()
                single.append(time.perf_counter() - started)
            seconds = statistics.median(single)
            figures["single"] = {"steps": arguments.steps_single, "seconds": round(seconds, 3), "it_per_s": round(arguments.steps_single / seconds, 2)}
        for batch in arguments.batch_sizes:
            figures[f"batch_{batch}"] = load(url, batch, arguments, lambda index: body(index, arguments.steps, arguments.size))
        lora_batch = arguments.lora_users  # a batch of distinct LoRAs: one request of each user at a time
        figures["one_lora"] = load(url, lora_batch, arguments, lambda index: body(index, arguments.steps, arguments.size, "lora-0"))
        figures["distinct_loras"] = load(
            url, lora_batch, arguments, lambda index: body(index, arguments.steps, arguments.size, f"lora-{index % arguments.lora_users}")
        )
        health = httpx.get(f"{url}/health", timeout=30).json()
        figures["peak_memory_bytes"] = health.get("device_memory_peak_bytes", 0)
        figures["compile"] = health.get("compile")
        figures["device"] = health.get("device")
    finally:
        process.terminate()
        process.wait(timeout=120)
    figures["recompile_reasons"] = recompile_reasons(data_dir / "server.log")
    return figures


def recompile_reasons(log: Path) -> list[str]:
    """The guard failures that made the server recompile (TORCH_LOGS=recompiles), each once."""
    lines = log.read_text(errors="replace").splitlines()
    return list(dict.fromkeys(line.split("] ", 2)[-1].strip() for line in lines if "[__recompiles]" in line and "- " in line))


def load(url: str, batch: int, arguments: argparse.Namespace, make_body) -> dict:
    """Two batches' worth of requests from ``batch`` clients (one warm-up round first); images/s and the mean batch."""
    figures = asyncio.run(load_generator.run_load(url, 2 * batch, batch, make_body, warm_ups=1))
    return {key: figures[key] for key in ("images_per_s", "mean_batch_size", "latency_p50_s", "failed_requests")} | {"steps": arguments.steps}


def ratios(report: dict, arguments: argparse.Namespace) -> dict:
    """Served/raw for the single image and at each batch size, and distinct LoRAs/one LoRA, per compile setting measured
    (the ``single`` row: one image at ``--steps-single``; the ``batch_N`` rows: N clients at ``--steps``)."""
    result = {}
    for mode in ("eager", "compiled"):
        raw, served = report["raw"].get(mode), report["served"].get(mode)
        if not raw or not served:
            continue
        result[mode] = {
            "served_over_raw_single": round(raw["single"]["seconds"] / served["single"]["seconds"], 3),
            **{f"served_over_raw_batch_{b}": round(served[f"batch_{b}"]["images_per_s"] / raw[f"batch_{b}"]["images_per_s"], 3) for b in arguments.batch_sizes},
            "distinct_over_one_lora": round(served["distinct_loras"]["images_per_s"] / served["one_lora"]["images_per_s"], 3),
        }
    return result


def machine() -> dict:
    """What ran the benchmark: device, versions."""
    import diffusers
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cuda": torch.version.cuda, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count()}  # fmt: skip


def main() -> None:
    """Run the parts in order, writing the JSON after each; print it at the end."""
    arguments = parse_arguments()
    if arguments.part == "raw":
        print(json.dumps(raw_part(arguments)))
        return
    began = time.monotonic()
    modes = {"off": ["eager"], "on": ["compiled"], "both": ["compiled", "eager"]}[arguments.compile]
    report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "smoke": arguments.smoke,
                    "size": arguments.size, "batches": arguments.batch_sizes, "lora_users": arguments.lora_users,
                    "compile_mode": arguments.compile_mode, "raw": {}, "served": {}, "skipped": [], "errors": {}}  # fmt: skip

    def write() -> None:
        report["ratios"] = ratios(report, arguments)
        report["elapsed_s"] = round(time.monotonic() - began, 1)
        if arguments.json:
            arguments.json.parent.mkdir(parents=True, exist_ok=True)
            arguments.json.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        arguments.model = str(prepare_models(folder / "models", arguments))
        report["prepare_s"] = round(time.perf_counter() - started, 1)
        cache_dir = folder / "compile-cache"  # the raw part's kernels are the server's: it warms from them
        for mode in modes:
            extra = compile_settings(arguments, cache_dir) if mode == "compiled" else {}
            for part in ("raw", "served"):
                if time.monotonic() - began > arguments.deadline_s:
                    report["skipped"].append(f"{part} {mode}: past --deadline-s")
                    continue
                try:
                    if part == "raw":
                        report["raw"][mode] = run_raw(arguments, Path(arguments.model), {**os.environ, **extra}, mode == "compiled")
                    else:
                        report["served"][mode] = served_part(arguments, folder / "models", folder / f"data-{mode}", extra)
                except Exception as error:  # one part's failure must not lose the others' figures
                    report["errors"][f"{part} {mode}"] = str(error)[-2000:]
                write()
    write()
    print(json.dumps(report, indent=2))
    if report["errors"]:
        raise SystemExit(f"parts failed: {', '.join(report['errors'])}")


if __name__ == "__main__":
    main()
