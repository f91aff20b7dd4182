"""`./start.sh --demo --ray`, as a user runs it: the service on the demo model with its batches on a local Ray,
driven by the smoke client through every endpoint; SIGTERM stops it and the Ray it started."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from helpers import DEADLINE_S, PROJECT_DIR, free_port, poll, wait_until_healthy


def ray_processes() -> set[int]:
    """Process ids of the Ray head processes (GCS, raylet) on this machine now."""
    result = subprocess.run(["pgrep", "-f", "gcs_server|raylet"], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def test_start_sh_demo_ray_serves_every_endpoint_and_stops_its_ray(tmp_path):
    port = free_port()
    ray_before = ray_processes()
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("RAY_")},
        "SD_VENV": str(Path(sys.executable).parent.parent), "SD_HOST": "127.0.0.1", "SD_PORT": str(port),
        "SD_DATA_DIR": str(tmp_path / "data"), "SD_DATABASE_URL": "", "SD_OUTPUT_DIR": str(tmp_path / "output"),
        "SD_RAY_REPLICAS": "2", "SD_RATE_LIMIT": "",
    }  # fmt: skip
    process = subprocess.Popen(["./start.sh", "--demo", "--ray"], cwd=PROJECT_DIR, env=environment, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        poll(lambda: httpx.get(f"{url}/health/ready", timeout=5).status_code, lambda status: status == 200, "the demo model on a replica")
        health = httpx.get(f"{url}/health", timeout=5).json()
        assert health["device"] == "ray" and health["loaded_models"] == ["demo"]

        smoke = subprocess.run(
            [sys.executable, "test_api.py", "--url", url, "--out", str(tmp_path / "images"), "--steps", "2", "--size", "256"],
            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=DEADLINE_S,
        )  # fmt: skip
        assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
        assert "all endpoints answered as expected" in smoke.stdout
        placement = httpx.get(f"{url}/health", timeout=5).json()["cache"]["ray"]
        assert placement["jobs"] >= 8 and placement["reruns"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=DEADLINE_S)
    assert returncode == -signal.SIGTERM, "uvicorn re-raises the signal after its graceful shutdown; -6 would be Ray's abort"
    poll(lambda: ray_processes() - ray_before, lambda left: not left, "the Ray the server started stopping with it")
