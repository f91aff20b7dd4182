"""What N GPUs serve to M users under SD_ENGINE=ray: a discrete-event simulation of the queue and Serve's routing.

Not a measurement: a model of one, with these assumptions (change them with the options):
  - SD1.5 at 512x512, 30 steps, CFG (two UNet samples per image), float16. A UNet call on B samples takes what
    this project measured on an NVIDIA H200 (README, "Batching across users' LoRAs": 24.4 ms at 1 sample, 28.9
    at 4, 50.2 at 8, 94.8 at 16, 183.5 at 32; linear between), plus 40 ms per image for the VAE and the rest.
  - Bringing a base checkpoint onto a replica that lacks it takes --load-s (default 3 s: 2 GB of fp16 weights
    from local disk or the page cache); a LoRA on a resident base costs nothing (mixed batches).
  - Requests of 4 images arrive as a Poisson stream at --load (a fraction of the cluster's ideal capacity,
    batches of 8 and no loads); users are picked by a Zipf law (exponent --zipf): few are busy, most rare.
  - --dreambooth-share of users have their own checkpoint; the rest have a LoRA on one shared base.
  - The queue batches requests of one base up to 8 images; a free replica takes the oldest batch whose base it
    holds, else (after 1 s, Serve's matching timeout, or when no replica holds it) the oldest batch, loading
    its base and unloading its least recently used one past --models-per-replica.

    .venv/bin/python benchmarks/sim_ray_cluster.py                      # the table for N = 1..16, M = 10..10000
    .venv/bin/python benchmarks/sim_ray_cluster.py --gpus 8 --users 1000 --dreambooth-share 0.2
"""

import argparse
import heapq
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass, field

UNET_MS = [(1, 24.4), (4, 28.9), (8, 50.2), (16, 94.8), (32, 183.5)]  # samples -> ms, H200 float16 512x512
IMAGES_PER_REQUEST = 4
MAX_BATCH_IMAGES = 8
MATCHING_TIMEOUT_S = 1.0


def unet_ms(samples: int) -> float:
    """Milliseconds of one UNet call on ``samples`` latents, interpolated from the measured points."""
    for (low, low_ms), (high, high_ms) in zip(UNET_MS, UNET_MS[1:]):
        if samples <= high:
            return low_ms + (high_ms - low_ms) * (max(samples, low) - low) / (high - low)
    return UNET_MS[-1][1] * samples / UNET_MS[-1][0]


def batch_seconds(images: int, steps: int) -> float:
    """One pipeline call of ``images`` images: ``steps`` UNet calls on 2 x images samples, and 40 ms per image."""
    return steps * unet_ms(2 * images) / 1000 + 0.04 * images


@dataclass
class Replica:
    """A GPU: the bases it holds (least recently used first) and when it is free."""

    models: OrderedDict = field(default_factory=OrderedDict)
    free_at: float = 0.0


def simulate(arguments: argparse.Namespace, gpus: int, users: int, seed: int = 0) -> dict:
    """Run the model for --requests requests; throughput, loads and latency."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1 / (rank + 1) ** arguments.zipf for rank in range(users)))
    own_checkpoint = [rng.random() < arguments.dreambooth_share for _ in range(users)]
    capacity = gpus * MAX_BATCH_IMAGES / batch_seconds(MAX_BATCH_IMAGES, arguments.steps)  # images/s, no loads
    rate = arguments.load * capacity / IMAGES_PER_REQUEST  # requests/s
    arrivals, now = [], 0.0
    for index in range(arguments.requests):
        now += rng.expovariate(rate)
        user = rng.choices(range(users), cum_weights=cumulative)[0]
        arrivals.append((now, index, f"user-{user}" if own_checkpoint[user] else "shared-base"))
    replicas = [Replica() for _ in range(gpus)]
    queue: list[tuple[float, str]] = []  # (arrival, base), in arrival order
    latencies, loads, batches = [], 0, 0
    events = [(replica.free_at, "free", index) for index, replica in enumerate(replicas)]
    heapq.heapify(events)
    pending = iter(arrivals)
    next_arrival = next(pending, None)
    while events or next_arrival:
        if next_arrival and (not events or next_arrival[0] <= events[0][0]):
            queue.append((next_arrival[0], next_arrival[2]))
            now, next_arrival = next_arrival[0], next(pending, None)
            idle = [index for index, replica in enumerate(replicas) if replica.free_at <= now]
            for index in idle:
                heapq.heappush(events, (now, "free", index))
            continue
        now, _, index = heapq.heappop(events)
        replica = replicas[index]
        if replica.free_at > now or not queue:
            continue
        chosen = pick_batch(queue, replica, replicas, now)
        if chosen is None:
            heapq.heappush(events, (queue[0][0] + MATCHING_TIMEOUT_S, "free", index))
            continue
        base = queue[chosen][1]
        taken = [request for request in queue if request[1] == base][: MAX_BATCH_IMAGES // IMAGES_PER_REQUEST]
        for request in taken:
            queue.remove(request)
        seconds = batch_seconds(len(taken) * IMAGES_PER_REQUEST, arguments.steps)
        if base not in replica.models:
            loads += len(taken)
            seconds += arguments.load_s
            if len(replica.models) >= arguments.models_per_replica:
                replica.models.popitem(last=False)
        replica.models[base] = True
        replica.models.move_to_end(base)
        replica.free_at = now + seconds
        latencies += [replica.free_at - arrival for arrival, _ in taken]
        batches += 1
        heapq.heappush(events, (replica.free_at, "free", index))
    latencies.sort()
    served = arguments.requests * IMAGES_PER_REQUEST / max(replica.free_at for replica in replicas)
    return {
        "images_per_s": served,
        "capacity": capacity,
        "no_load": 1 - loads / arguments.requests,
        "mean_batch": arguments.requests * IMAGES_PER_REQUEST / batches,
        "p50": latencies[len(latencies) // 2],
        "p95": latencies[int(len(latencies) * 0.95)],
    }


def pick_batch(queue: list[tuple[float, str]], replica: Replica, replicas: list[Replica], now: float) -> int | None:
    """Index of the request whose batch this free replica takes: the oldest of a base it holds; else the oldest
    one once it has waited out the matching timeout or no replica holds its base; None: leave it for now."""
    for position, (_, base) in enumerate(queue):
        if base in replica.models:
            return position
    arrival, base = queue[0]
    held_elsewhere = any(base in other.models for other in replicas if other is not replica)
    return 0 if now >= arrival + MATCHING_TIMEOUT_S or not held_elsewhere else None


def main() -> None:
    """The table over GPU and user counts, or one cell."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--users", type=int, nargs="*", default=[10, 100, 1000, 10000])
    parser.add_argument("--dreambooth-share", type=float, default=1.0, help="users with their own checkpoint")
    parser.add_argument("--models-per-replica", type=int, default=16, help="SD_RAY_MODELS_PER_REPLICA (80 GB GPU: ~16-20)")
    parser.add_argument("--load", type=float, default=0.7, help="offered load, a fraction of the ideal capacity")
    parser.add_argument("--load-s", type=float, default=3.0, help="seconds to bring a checkpoint onto a GPU")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=4000)
    arguments = parser.parse_args()
    print(
        f"SD1.5 512x512 {arguments.steps} steps, H200 UNet timings, {IMAGES_PER_REQUEST} images per request, load "
        f"{arguments.load:.0%} of capacity, {arguments.dreambooth_share:.0%} own checkpoints, {arguments.models_per_replica} "
        f"models per replica, {arguments.load_s:g} s per load, Zipf {arguments.zipf}\n"
    )
    print("| GPUs | users | ideal images/s | served images/s | jobs without a load | mean batch | p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for gpus in arguments.gpus:
        for users in arguments.users:
            row = simulate(arguments, gpus, users)
            print(
                f"| {gpus} | {users} | {row['capacity']:.1f} | {row['images_per_s']:.1f} | {row['no_load']:.1%} "
                f"| {row['mean_batch']:.1f} | {row['p50']:.1f} | {row['p95']:.1f} |"
            )


if __name__ == "__main__":
    main()
