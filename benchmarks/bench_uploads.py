"""Upload benchmark: what heavy training uploads cost everyone else. Sends U training uploads at once (P one-colour
photos of S x S pixels each, the worst case for a decoder: tiny files, huge pictures) against the real server on the
demo model, while another client polls `GET /jobs`; prints how long those reads took meanwhile (p50, p99, max), what
each upload was answered and how long it took. ``--same-user`` sends every upload for one user (all but one are
refused before decoding); otherwise each upload is another user's (they share the decoding pool). Examples:

    .venv/bin/python benchmarks/bench_uploads.py                               # 6 uploads of 12 photos, 6300 px
    .venv/bin/python benchmarks/bench_uploads.py --same-user --json figures.json
    .venv/bin/python benchmarks/bench_uploads.py --uploads 2 --photos 3 --side 512   # smoke size
"""

import argparse
import asyncio
import io
import json
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from bench_serving import percentile, start_server

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"


def block_photos(count: int, side: int) -> list[bytes]:
    """``count`` distinct PNGs of ``side`` x ``side`` pixels: a light block, in a place of its own, on a colour."""
    photos = []
    for index in range(count):
        buffer = io.BytesIO()
        photo = Image.new("RGB", (side, side), (index * 20 % 256, 255 - index * 20 % 256, 90))
        corner = (index * side // 7) % (side // 2)  # a block in another place on each: distinct photos, not near-duplicates
        photo.paste((240, 240, 240), (corner, side // 4, corner + side // 3, side // 2))
        photo.save(buffer, format="PNG")
        photos.append(buffer.getvalue())
    return photos


async def measure(url: str, photos: list[bytes], arguments: argparse.Namespace) -> dict:
    """The uploads at once, and GET /jobs polled until they are answered."""
    files = [("images", (f"photo-{index}.png", data, "image/png")) for index, data in enumerate(photos)]
    fields = {"steps": "1", "resolution": "64", "activate": "false", "class_word": "shape"}  # no person: no face to look for
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        (await client.get("/jobs")).raise_for_status()
        reads: list[float] = []
        answers: list[tuple[int, float]] = []

        async def upload(index: int) -> None:
            user = "bench-upload" if arguments.same_user else f"bench-upload-{index}"
            started = time.perf_counter()
            response = await client.post(f"/users/{user}/trainings", files=files, data=fields)
            answers.append((response.status_code, time.perf_counter() - started))

        async def poll_jobs(done: asyncio.Event) -> None:
            while not done.is_set():
                started = time.perf_counter()
                (await client.get("/jobs", params={"limit": 5})).raise_for_status()
                reads.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        done = asyncio.Event()
        poller = asyncio.create_task(poll_jobs(done))
        started = time.perf_counter()
        await asyncio.gather(*(upload(index) for index in range(arguments.uploads)))
        elapsed = time.perf_counter() - started
        done.set()
        await poller
    return {
        "uploads": arguments.uploads, "photos": arguments.photos, "side": arguments.side, "same_user": arguments.same_user,
        "upload_bytes": sum(len(data) for data in photos), "all_answered_s": round(elapsed, 2),
        "statuses": sorted(status for status, _ in answers), "slowest_upload_s": round(max(seconds for _, seconds in answers), 2),
        "get_jobs_p50_s": round(percentile(reads, 50), 4), "get_jobs_p99_s": round(percentile(reads, 99), 4),
        "get_jobs_max_s": round(max(reads), 4), "get_jobs_reads": len(reads),
    }  # fmt: skip


def print_table(figures: dict) -> None:
    """The figures as a Markdown table."""
    print(f"{figures['uploads']} uploads at once ({'one user' if figures['same_user'] else 'one user each'}), "
          f"{figures['photos']} one-colour photos of {figures['side']}x{figures['side']} each ({figures['upload_bytes']} bytes)")  # fmt: skip
    print("| GET /jobs p50 s | p99 s | max s | reads | uploads answered | all answered s | slowest upload s |")
    print("|---|---|---|---|---|---|---|")
    statuses = ", ".join(f"{figures['statuses'].count(code)}x {code}" for code in sorted(set(figures["statuses"])))
    print(
        f"| {figures['get_jobs_p50_s']} | {figures['get_jobs_p99_s']} | {figures['get_jobs_max_s']} | {figures['get_jobs_reads']} "
        f"| {statuses} | {figures['all_answered_s']} | {figures['slowest_upload_s']} |"
    )


def main() -> None:
    """Serve the demo model, send the uploads, print the figures (and write them as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=6)
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--side", type=int, default=6300, help="pixels a side (6300: just under the 40-megapixel cap)")
    parser.add_argument("--same-user", action="store_true", help="every upload for one user")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    photos = block_photos(arguments.photos, arguments.side)
    with tempfile.TemporaryDirectory(prefix="bench-uploads-") as data_dir:
        extra = {"SD_TRAINING_MIN_PHOTO_SIDE": "64", "SD_PRELOAD_DEFAULT_MODEL": "false"}
        process, url = start_server(str(DEMO_MODEL_DIR), 1, argparse.Namespace(requests=1), Path(data_dir), extra)
        try:
            figures = asyncio.run(measure(url, photos, arguments))
        finally:
            process.terminate()
            process.wait(timeout=120)
    print_table(figures)
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
