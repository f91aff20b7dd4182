"""Fairness benchmark: the fair scheduler against FIFO on the demo model, through the API with one key per user.

Three scenarios, each on a fresh server:

- backlog: four heavy users queue ``--heavy-jobs`` jobs each (POST /jobs); once the first batch runs, a fifth
  user submits one job. Reports whether it got in, how long it waited for its first step, and how many batches
  started ahead of it after it was submitted (the jobs of a batch share their start time). FIFO runs with SD_QUEUE_RESERVE=0 (the queue as it was), fair with
  the defaults.
- equal: four users each keep ``--outstanding`` synchronous requests in flight for ``--duration`` seconds. Reports
  each user's images/s, Jain's fairness index of them, and the total, for fair and for FIFO (fair / FIFO total is
  what fairness costs in throughput).
- weighted: two users with key weights 1 and 2, each keeping ``--outstanding-weighted`` requests in flight: the
  share of the images each got, and the ratio (target 2).

Prints a table and the figures; ``--json`` writes them. Examples:

    .venv/bin/python benchmarks/bench_fairness.py --json benchmarks/results/fairness-cpu.json
    .venv/bin/python benchmarks/bench_fairness.py --duration 10 --heavy-jobs 2 --steps 2   # smoke size
"""

import argparse
import json
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

from bench_serving import DEMO_MODEL_DIR, running, start_server

ADMIN_KEY = "sdk_bench-fairness-admin-key-0123456789"
LIGHT_USER = "light"


def body(user: str, index: int, arguments: argparse.Namespace) -> dict:
    """One request of ``user``: every request has the same shape, so users' jobs can share a batch."""
    return {
        "prompt": f"a photo of sks person, {user} variation {index}",
        "seed": index,
        "num_inference_steps": arguments.steps,
        "width": arguments.size,
        "height": arguments.size,
    }


def serve(arguments: argparse.Namespace, data_dir: Path, users: list[str], scheduling: str, reserve: int | None = None) -> tuple:
    """A server of the model with keys on, every one of ``users`` on it, SD_SCHEDULING ``scheduling`` and no rate
    limits."""
    extra = {
        "SD_USER_MODELS": json.dumps({user: str(arguments.model) for user in users}),
        "SD_SCHEDULING": scheduling,
        "SD_ADMIN_KEY": ADMIN_KEY,
        "SD_AUTH": "required",
        "SD_READ_RATE_LIMIT": "",
        **({"SD_QUEUE_RESERVE": str(reserve)} if reserve is not None else {}),
    }
    queue_size = argparse.Namespace(requests=0)  # SD_MAX_QUEUE stays at its default, 64
    return start_server(str(arguments.model), arguments.batch, queue_size, data_dir, extra)


def user_keys(url: str, weights: dict[str, float]) -> dict[str, dict[str, str]]:
    """A key per user with its weight; the headers that use each."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = {}
    for user, weight in weights.items():
        answer = httpx.post(f"{url}/keys", json={"user_id": user, "weight": weight}, headers=admin, timeout=30)
        answer.raise_for_status()
        keys[user] = {"Authorization": f"Bearer {answer.json()['key']}"}
    return keys


def wait_job(url: str, job_id: str, headers: dict[str, str], done: set[str], timeout_s: float = 900) -> dict:
    """Poll a job until its status is in ``done``; its JSON."""
    deadline, last = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        last = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=30).json()
        if last["status"] in done:
            return last
        time.sleep(0.1)
    raise SystemExit(f"job {job_id} did not reach {done} within {timeout_s:g} s; last seen: {last}")


def backlog_scenario(arguments: argparse.Namespace, scheduling: str, reserve: int | None) -> dict:
    """Four heavy backlogs, then one light user's job: admitted?, its wait, the batches that started ahead of it."""
    heavy_users = [f"heavy{index}" for index in range(4)]
    weights = {user: 1.0 for user in [*heavy_users, LIGHT_USER]}
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as data_dir, running(serve(arguments, Path(data_dir), list(weights), scheduling, reserve)) as url:
        keys = user_keys(url, weights)
        heavy = [
            (user, httpx.post(f"{url}/jobs", json=body(user, index, arguments), headers=keys[user], timeout=60).json()["job_id"])
            for index in range(arguments.heavy_jobs)
            for user in heavy_users
        ]
        wait_job(url, heavy[0][1], keys[heavy[0][0]], {"running", "succeeded"})
        answer = httpx.post(f"{url}/jobs", json=body(LIGHT_USER, 0, arguments), headers=keys[LIGHT_USER], timeout=60)
        row: dict = {"scenario": "backlog", "scheduling": scheduling, "light_status_code": answer.status_code}
        if answer.status_code == 202:
            light = wait_job(url, answer.json()["job_id"], keys[LIGHT_USER], {"succeeded", "failed"})
            starts = {
                job["started_at"]
                for job in (httpx.get(f"{url}/jobs/{job_id}", headers=keys[user], timeout=30).json() for user, job_id in heavy)
                if job["started_at"] and light["created_at"] <= job["started_at"] < light["started_at"]
            }
            created, started = (time_of(light[name]) for name in ("created_at", "started_at"))
            row |= {"light_wait_s": round(started - created, 2), "batches_ahead": len(starts), "light_position": answer.json()["position"]}
    return row


def time_of(stamp: str) -> float:
    """Seconds since the epoch of an ISO 8601 time from the API."""
    return datetime.fromisoformat(stamp).timestamp()


def closed_loop(url: str, keys: dict[str, dict[str, str]], outstanding: int, arguments: argparse.Namespace) -> dict[str, float]:
    """Each user keeps ``outstanding`` synchronous requests in flight for the duration; each user's images/s over
    the window after the warm-up."""
    start = time.monotonic()
    window = (start + arguments.warm_up, start + arguments.warm_up + arguments.duration)
    done: dict[str, int] = {user: 0 for user in keys}
    failed: list[str] = []
    lock = threading.Lock()

    def client(user: str, lane: int) -> None:
        with httpx.Client(base_url=url, headers=keys[user], timeout=600) as http:
            index = lane
            while time.monotonic() < window[1]:
                answer = http.post("/generate", json=body(user, index, arguments))
                finished = time.monotonic()
                with lock:
                    if answer.status_code != 200:
                        failed.append(f"{user}: HTTP {answer.status_code} {answer.text[:200]}")
                    elif window[0] <= finished <= window[1]:
                        done[user] += 1
                index += outstanding

    threads = [threading.Thread(target=client, args=(user, lane)) for user in keys for lane in range(outstanding)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, the first: {failed[0]}")
    return {user: count / arguments.duration for user, count in done.items()}


def jain_index(rates: list[float]) -> float:
    """Jain's fairness index: 1 when every user gets the same, 1/n when one user gets everything."""
    return sum(rates) ** 2 / (len(rates) * sum(rate * rate for rate in rates)) if any(rates) else 0.0


def equal_scenario(arguments: argparse.Namespace, scheduling: str) -> dict:
    """Four users with equal demand: each one's images/s, Jain's index and the total."""
    users = {f"user{index}": 1.0 for index in range(4)}
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as data_dir, running(serve(arguments, Path(data_dir), list(users), scheduling)) as url:
        rates = closed_loop(url, user_keys(url, users), arguments.outstanding, arguments)
    values = list(rates.values())
    return {
        "scenario": "equal",
        "scheduling": scheduling,
        "images_per_s_by_user": {user: round(rate, 3) for user, rate in rates.items()},
        "jain_index": round(jain_index(values), 4),
        "total_images_per_s": round(sum(values), 3),
    }


def weighted_scenario(arguments: argparse.Namespace) -> dict:
    """Two users of weights 1 and 2 with equal demand: their shares of the images and the ratio."""
    users = {"weight1": 1.0, "weight2": 2.0}
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as data_dir, running(serve(arguments, Path(data_dir), list(users), "fair")) as url:
        rates = closed_loop(url, user_keys(url, users), arguments.outstanding_weighted, arguments)
    total = sum(rates.values()) or 1.0
    return {
        "scenario": "weighted",
        "scheduling": "fair",
        "images_per_s_by_user": {user: round(rate, 3) for user, rate in rates.items()},
        "share_by_user": {user: round(rate / total, 4) for user, rate in rates.items()},
        "ratio": round(rates["weight2"] / rates["weight1"], 3) if rates["weight1"] else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="SD_MAX_BATCH_SIZE")
    parser.add_argument("--heavy-jobs", type=int, default=16, help="jobs each heavy user queues (backlog)")
    parser.add_argument("--duration", type=float, default=120, help="seconds each closed-loop scenario is measured")
    parser.add_argument("--warm-up", type=float, default=10, help="seconds of load before the measurement")
    parser.add_argument("--outstanding", type=int, default=4, help="requests each user keeps in flight (equal)")
    parser.add_argument("--outstanding-weighted", type=int, default=12, help="requests each user keeps in flight (weighted)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()

    rows = [
        backlog_scenario(arguments, "fifo", reserve=0),
        backlog_scenario(arguments, "fair", reserve=None),
        equal_scenario(arguments, "fifo"),
        equal_scenario(arguments, "fair"),
        weighted_scenario(arguments),
    ]
    fifo_equal, fair_equal = rows[2], rows[3]
    figures = {
        # 0.0 when FIFO finished nothing in the window (a smoke run's few seconds on a busy machine), as "ratio" does
        "fair_over_fifo_throughput": round(fair_equal["total_images_per_s"] / fifo_equal["total_images_per_s"], 3) if fifo_equal["total_images_per_s"] else 0.0,
        "fair_jain_index": fair_equal["jain_index"],
        "weighted_ratio": rows[4]["ratio"],
        "light_user_batches_ahead_fair": rows[1].get("batches_ahead"),
        "light_user_wait_s_fair": rows[1].get("light_wait_s"),
        "light_user_wait_s_fifo": rows[0].get("light_wait_s"),
    }
    settings = {name: str(value) if isinstance(value, Path) else value for name, value in vars(arguments).items()}
    result = {"settings": settings, "rows": rows, "figures": figures}
    for row in rows:
        print(json.dumps(row))
    for name, value in figures.items():
        print(f"{name}: {value}")
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
