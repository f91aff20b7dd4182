"""The serving benchmarks' ceiling: the engine's own loop over the requests, no HTTP and no queue, in a fresh process.

``--thread main`` runs it on the process's main thread, ``--thread worker`` on a second thread (where the server's
device thread runs it); ``--png`` also PNG-encodes each batch's images on an encoder thread, as the server does;
``--preview-every`` makes previews as SD_PREVIEW_EVERY does (the server's default unless given).
Prints one JSON object: images/s, latency p50/p99 (a batch's images wait for the whole batch), the mean batch.

    .venv/bin/python benchmarks/raw_loop.py --thread worker --batch 4 --requests 32 --png
"""

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load_generator import percentile, request_body  # noqa: E402

from config import Settings  # noqa: E402
from model_service import ModelService  # noqa: E402
from sd_server.domain.models import CheckpointModel  # noqa: E402
from sd_server.engine.interface import BatchItem, BatchKey  # noqa: E402


def run_loop(service: ModelService, model: str, arguments: argparse.Namespace) -> dict:
    """Load and warm up, then run the requests in batches of ``--batch``; the figures."""
    checkpoint = CheckpointModel(source=model)
    key = BatchKey(model, arguments.size, arguments.size, arguments.steps, 7.5, None)
    items = [
        BatchItem(checkpoint, request_body(index, arguments.steps, arguments.size)["prompt"], None, index, 1) for index in range(arguments.requests)
    ]
    service.run_batch(key, items[:1], lambda step, total, previews=None: None, lambda: False)  # load, warm up
    latencies: list[float] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
        started = time.perf_counter()
        for first in range(0, len(items), arguments.batch):
            batch_started = time.perf_counter()
            output = service.run_batch(key, items[first : first + arguments.batch], lambda step, total, previews=None: None, lambda: False)
            assert output is not None
            if arguments.png:
                images = [image for images in output.images for image in images]
                encoder.submit(service.encode, images, ["raw loop"] * len(images))
            latencies += [time.perf_counter() - batch_started] * len(output.images)
    elapsed = time.perf_counter() - started  # the encoder has finished: leaving the pool waited for it
    return {
        "images_per_s": round(arguments.requests / elapsed, 3),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "mean_batch_size": round(arguments.requests / -(-arguments.requests // arguments.batch), 2),
    }


def main() -> None:
    """Parse arguments, run the loop on the chosen thread, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "demo"))
    parser.add_argument("--thread", choices=("main", "worker"), default="main")
    parser.add_argument("--png", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preview-every", type=int, default=Settings.model_fields["preview_every"].default, help="SD_PREVIEW_EVERY (0: none)")
    arguments = parser.parse_args()
    service = ModelService(Settings(_env_file=None, default_model=arguments.model, preview_every=arguments.preview_every))
    if arguments.thread == "main":
        figures = run_loop(service, arguments.model, arguments)
    else:
        result: list[dict] = []
        worker = threading.Thread(target=lambda: result.append(run_loop(service, arguments.model, arguments)), name="raw-worker")
        worker.start()
        worker.join()
        figures = result[0]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
