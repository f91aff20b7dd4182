"""Container benchmark: what the image costs to build, weighs and takes to serve. Builds it with docker/build.sh
(``--no-cache``: from nothing but the base image, as a first build does), then runs it on the demo model and prints,
as JSON: the build's seconds, the image's size, seconds from `docker run` to /health/ready, the first image's and
then the median image's seconds (POST /generate), the container's memory, and how long `docker stop` took. Examples:

    .venv/bin/python benchmarks/bench_container.py --no-cache --json benchmarks/results/container-cpu.json
    .venv/bin/python benchmarks/bench_container.py --requests 1 --skip-build --image sd-server:latest   # smoke size
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import httpx
from load_generator import free_port

PROJECT_DIR = Path(__file__).resolve().parent.parent
REQUEST = {"prompt": "a red circle on a blue background", "num_inference_steps": 20, "width": 256, "height": 256}


def docker(*arguments: str) -> str:
    """A docker command's output; raises with what it printed when it fails."""
    result = subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(arguments)}: {result.stderr[-2000:]}")
    return result.stdout


def build(image: str, no_cache: bool) -> float:
    """docker/build.sh; its seconds."""
    started = time.perf_counter()
    arguments = ["--no-cache"] if no_cache else []
    result = subprocess.run(["docker/build.sh", *arguments], cwd=PROJECT_DIR, env={**os.environ, "SERVER_IMAGE": image}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the build failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started


def wait_until_ready(url: str, deadline_s: float = 600) -> float:
    """Seconds until /health/ready answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < deadline_s:
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health/ready did not answer 200 in {deadline_s} s")


def memory_mib(name: str) -> float:
    """The container's memory now, in MiB, as docker stats reads it."""
    usage = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name).split("/")[0].strip()
    number, unit = float(usage.rstrip("KMGiB")), usage.lstrip("0123456789.")
    return number * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def serve(image: str, requests: int, port: int) -> dict:
    """Run the image, time its start, its images and its stop."""
    name = f"sd-bench-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-e", "SD_RATE_LIMIT=", image)
    try:
        wait_until_ready(url)
        ready_s = time.perf_counter() - started  # from docker run, its own start included
        seconds = []
        for index in range(requests + 1):
            request_started = time.perf_counter()
            httpx.post(f"{url}/generate", json={**REQUEST, "seed": index}, timeout=600).raise_for_status()
            seconds.append(time.perf_counter() - request_started)
        memory = memory_mib(name)
        stop_started = time.perf_counter()
        docker("stop", "--time", "90", name)
        stop_s = time.perf_counter() - stop_started
        exit_code = int(docker("inspect", "--format", "{{.State.ExitCode}}", name))
    finally:
        subprocess.run(["docker", "rm", "--force", "--volumes", name], capture_output=True)
    return {
        "ready_s": round(ready_s, 2),
        "first_image_s": round(seconds[0], 3),
        "image_p50_s": round(statistics.median(seconds[1:]), 3),
        "memory_mib": round(memory),
        "stop_s": round(stop_s, 2),
        "stop_exit_code": exit_code,
    }


def main() -> None:
    """Parse the arguments, build, serve, print (and write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="sd-server:bench")
    parser.add_argument("--no-cache", action="store_true", help="build from nothing but the base image")
    parser.add_argument("--skip-build", action="store_true", help="time the image --image names as it is (build_s: null)")
    parser.add_argument("--requests", type=int, default=10, help="images timed after the first")
    parser.add_argument("--port", type=int, default=0, help="the host's port for the container (0: a free one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    build_s = None if arguments.skip_build else round(build(arguments.image, arguments.no_cache), 1)
    size = json.loads(docker("image", "inspect", arguments.image))[0]["Size"]
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "docker": docker("version", "--format", "{{.Server.Version}}").strip(),
        "request": REQUEST,
        "build_s": build_s,
        "build_from_scratch": arguments.no_cache,
        "image_mb": round(size / 1e6),
        **serve(arguments.image, arguments.requests, arguments.port or free_port()),
    }
    print(json.dumps(figures, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
