"""The serving benchmarks' load: N requests from C concurrent clients, with a light endpoint polled meanwhile.

Run as its own process by ``bench_serving.py`` (so that its CPU does not count against the server it measures),
it prints one JSON object: images/s (of the requests that succeeded), the requests that failed, latency percentiles,
the light endpoint's p99 and its own CPU share.

    .venv/bin/python benchmarks/load_generator.py --url http://127.0.0.1:8000 --requests 32 --clients 4
"""

import argparse
import asyncio
import json
import math
import os
import socket
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def request_body(index: int, steps: int, size: int) -> dict:
    """Request ``index`` of a run: same shape for all, so they can be batched; its own prompt and seed."""
    return {"prompt": f"a photo of sks person, variation {index}", "seed": index, "num_inference_steps": steps, "width": size, "height": size}


async def batches_run(client: httpx.AsyncClient) -> tuple[int, float, str]:
    """Batches the server has run, images they held and its device, from its /health (0, 0, "" where it does not
    say)."""
    health = (await client.get("/health")).json()
    queue = health.get("queue", {})
    batches = queue.get("batches_run", 0)
    return batches, queue.get("mean_batch_size", 0.0) * batches, health.get("device", "")


async def run_load(
    url: str, requests: int, clients: int, body: Callable[[int], dict], warm_ups: int = 1, light_path: str = "/health"
) -> dict:
    """Send ``warm_ups`` requests one by one (they load the models), then ``requests`` from ``clients`` concurrent
    clients while polling ``light_path``; the figures of the run."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        first_started = time.perf_counter()
        for index in range(requests, requests + warm_ups):
            (await client.post("/generate/image", json=body(index))).raise_for_status()
        first_image_at = time.perf_counter()
        batches_before, images_before, _ = await batches_run(client)
        indexes = iter(range(requests))
        latencies: list[float] = []
        failures: list[int] = []  # status codes of the requests that failed (a naive server may fail under load)
        health_latencies: list[float] = []
        done = asyncio.Event()

        async def client_loop() -> None:
            for index in indexes:
                started = time.perf_counter()
                response = await client.post("/generate/image", json=body(index))
                if response.is_success:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(response.status_code)

        async def poll_health() -> None:
            while not done.is_set():
                started = time.perf_counter()
                (await client.get(light_path)).raise_for_status()
                health_latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_health())
        cpu_started, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        done.set()
        await poller
        batches_after, images_after, device = await batches_run(client)
    batches = batches_after - batches_before
    if not latencies:
        raise SystemExit(f"every request failed: {sorted(set(failures))}")
    return {
        "images_per_s": round(len(latencies) / elapsed, 3),
        "failed_requests": len(failures),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "health_p99_s": round(percentile(health_latencies, 99), 4),
        "mean_batch_size": round((images_after - images_before) / batches, 2) if batches else 1.0,
        "first_request_s": round(first_image_at - first_started, 3),
        "load_cpu_share": round(cpu / elapsed / (os.cpu_count() or 1), 3),
        "device": device,
    }


def main() -> None:
    """Parse arguments, run the load, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warm-ups", type=int, default=1)
    parser.add_argument("--light-path", default="/health", help="the light endpoint polled during the load")
    arguments = parser.parse_args()
    body = lambda index: request_body(index, arguments.steps, arguments.size)  # noqa: E731
    figures = asyncio.run(run_load(arguments.url, arguments.requests, arguments.clients, body, arguments.warm_ups, arguments.light_path))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
