"""Helpers the test modules share: free ports, pixels, and polls that wait with a generous deadline and fail
saying what they last saw (the suite runs on busy 2-core machines)."""

import base64
import contextlib
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEADLINE_S = 300  # generous: a wait that ends early costs nothing, one that ends late fails on a busy machine
POSTGRES_URL = os.environ.get("SD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")  # a throwaway database
TERMINAL = ("succeeded", "failed", "cancelled")
SLOW = {"width": 512, "height": 512, "num_inference_steps": 60}  # seconds on 2 CPU cores: long enough to act on it


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pixels(image_base64: str) -> np.ndarray:
    """The RGB pixels of a base64 PNG, as signed integers (so differences do not wrap)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_base64))).convert("RGB")).astype(np.int16)


def poll(read: Callable[[], Any], done: Callable[[Any], bool], what: str, timeout: float = DEADLINE_S, interval: float = 0.05) -> Any:
    """Call ``read`` until ``done`` says yes; fails after ``timeout`` seconds with the last value read."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = read()
        if done(last):
            return last
        time.sleep(interval)
    pytest.fail(f"{what}: not reached within {timeout:g} s; last seen: {last}")


def read_job(client, job_id: str, headers: dict | None = None) -> dict:
    """GET /jobs/{id} as JSON; fails on any answer but 200 (a 429 body is not a job)."""
    response = client.get(f"/jobs/{job_id}", headers=headers or {})
    assert response.status_code == 200, f"GET /jobs/{job_id} answered {response.status_code}: {response.text}"
    return response.json()


def post_job(client, request: Callable[..., dict], **fields) -> str:
    """POST /jobs with ``request(**fields)``; the new job's id."""
    response = client.post("/jobs", json=request(**fields))
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def wait_for(client, job_id: str, status: str | None = None, headers: dict | None = None, timeout: float = DEADLINE_S) -> dict:
    """Poll the job until it ends (or reaches ``status``); returns its JSON. ``client`` is a TestClient or an
    httpx.Client with a base URL."""
    reached = (lambda job: job["status"] == status) if status else (lambda job: job["status"] in TERMINAL)
    return poll(lambda: read_job(client, job_id, headers), reached, f"job {job_id} reaching {status or 'an end'}", timeout)


def wait_until_running(client, job_id: str, headers: dict | None = None) -> dict:
    """Wait until the job has run at least one denoising step."""
    return poll(
        lambda: read_job(client, job_id, headers),
        lambda job: job["status"] == "running" and job["progress"]["step"] >= 1,
        f"job {job_id} running a step",
    )


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of an SSE stream."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def follow_events(client, url: str) -> tuple[threading.Thread, threading.Event, list]:
    """Read an event stream on a thread: the thread, an event set once the stream has begun (its subscriber is in
    place), and the list its (event, data) pairs are put in when it ends."""
    begun, events = threading.Event(), []

    def read() -> None:
        with client.stream("GET", url) as stream:
            text = ""
            for chunk in stream.iter_text():
                begun.set()
                text += chunk
        events.extend(parse_sse(text))

    reader = threading.Thread(target=read)
    reader.start()
    return reader, begun, events


def png_bytes(seed: int = 0, size: int = 256) -> bytes:
    """A photo-like PNG of random pixels (distinct for each seed)."""
    noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks in order, as (type, data)."""
    chunks, offset = [], 8
    while offset < len(png):
        length = int.from_bytes(png[offset : offset + 4], "big")
        chunks.append((png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def png_of_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG made of these chunks, each with its length and a correct CRC."""
    body = b"".join(len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big") for kind, data in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def with_pixels_changed(png: bytes) -> bytes:
    """The PNG with one pixel changed and every other chunk (its signed credentials too) kept: a well-formed file
    that is no longer what was signed."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.putpixel((0, 0), tuple(255 - value for value in image.getpixel((0, 0))))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    new_data = [data for kind, data in png_chunks(buffer.getvalue()) if kind == b"IDAT"]
    chunks = [chunk for chunk in png_chunks(png) if chunk[0] != b"IDAT"]
    end = next(index for index, (kind, _) in enumerate(chunks) if kind == b"IEND")
    return png_of_chunks(chunks[:end] + [(b"IDAT", data) for data in new_data] + chunks[end:])


def with_text_changed(png: bytes, key: str, text: str) -> bytes:
    """The PNG with its ``key`` text chunk saying ``text`` instead, everything else kept."""
    prefix = key.encode() + b"\0"
    return png_of_chunks([(kind, prefix + text.encode("latin-1") if kind == b"tEXt" and data.startswith(prefix) else data) for kind, data in png_chunks(png)])


@contextlib.contextmanager
def main_server(environment: dict[str, str]) -> Iterator[str]:
    """`python main.py` on a free port of 127.0.0.1 with these SD_ variables, as start.sh runs it; yields its URL
    once /health answers, and stops it after."""
    port = free_port()
    variables = {**os.environ, **environment, "SD_HOST": "127.0.0.1", "SD_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "main.py"], cwd=PROJECT_DIR, env=variables)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=DEADLINE_S)


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = DEADLINE_S) -> None:
    """Poll /health until it answers; fail if the process exits or the time runs out."""

    def read() -> int | str:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.TransportError as error:
            return repr(error)

    poll(read, lambda status: status == 200, f"{url}/health answering", timeout, interval=0.2)


class WebhookReceiver:
    """A local HTTP server that answers 500 to the first ``failures`` POSTs, then 200, and keeps the bodies (parsed,
    and as sent with their headers)."""

    def __init__(self, failures: int = 0, port: int | None = None) -> None:
        self.bodies: list[dict] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []  # each POST's headers and body as sent
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(receiver.statuses) < failures else 200
                receiver.raw.append((dict(self.headers.items()), raw))
                receiver.bodies.append(json.loads(raw))
                receiver.statuses.append(status)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()


class FloodingReceiver:
    """A webhook receiver that answers 200 with a body of 400 MB, sent slowly: counts what it managed to send."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.sent = 0
        self.closed_by_client = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        connection.recv(65536)  # the request
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 400000000\r\n\r\n")
        chunk = b"x" * 65536
        try:
            while self.sent < 400_000_000:
                connection.sendall(chunk)
                self.sent += len(chunk)
                time.sleep(0.01)
        except OSError:
            self.closed_by_client.set()
        finally:
            connection.close()

    def close(self) -> None:
        """Stop listening."""
        self.listener.close()


class SilentReceiver:
    """A TCP server that accepts connections and never answers: a webhook receiver that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        """Drop every connection and stop listening."""
        for connection in self.connections:
            connection.close()
        self.listener.close()


def sqlite_file(settings) -> str:
    """The SQLite file of the test's database."""
    return settings.effective_database_url.removeprefix("sqlite:///")


class HeldLock:
    """Another process's write lock on the SQLite file, as long as the test holds it."""

    def __init__(self, path: str) -> None:
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.connection.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.connection.execute("ROLLBACK")
        self.connection.close()

