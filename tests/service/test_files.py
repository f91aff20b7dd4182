"""No file half-written or left behind: images are written whole or not at all, a crash's leftovers are removed
at start, a half-checked upload is never a model, and a job deleted or cancelled as it finishes leaves no image."""

import errno
import threading

import pytest
from fastapi.testclient import TestClient

from helpers import poll, wait_for
from sd_server.errors import StorageError
from sd_server.storage import images
from sd_server.storage.images import LocalStorage
from sd_server.storage.model_files import lora_file


def test_a_write_that_fails_midway_leaves_no_file(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "output")

    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images.os, "fsync", disk_full)
    with pytest.raises(StorageError, match="SD_OUTPUT_DIR"):
        storage.put("image.png", b"\x89PNG" + b"x" * 1000)

    assert list((tmp_path / "output").iterdir()) == []


def test_what_a_crash_left_half_written_is_removed_at_start(settings, app_factory, models_dir):
    settings.output_dir.mkdir(parents=True)
    (settings.output_dir / ".20260101-000000_1_ab.png.partial").write_bytes(b"\x89PN")
    kept = settings.output_dir / "20260101-000000_1_cd.png"
    kept.write_bytes(b"\x89PNG whole")
    (models_dir / ".staging").mkdir()
    (models_dir / ".staging" / "upload-0123.safetensors").write_bytes(b"half")
    (models_dir / "loras").mkdir()
    (models_dir / "loras" / ".upload-4567.safetensors").write_bytes(b"half, from an older version")

    with TestClient(app_factory(settings)):
        pass

    assert [path.name for path in settings.output_dir.iterdir()] == [kept.name]
    assert list((models_dir / ".staging").iterdir()) == [] and list((models_dir / "loras").iterdir()) == []


def test_a_half_checked_upload_is_never_taken_for_a_lora(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / ".upload-0123.safetensors").write_bytes(b"half")

    with pytest.raises(FileNotFoundError):
        lora_file(tmp_path, "loras")
    (folder / "alice.safetensors").write_bytes(b"whole")
    assert lora_file(tmp_path, "loras").name == "alice.safetensors"


@pytest.mark.parametrize("action", ["delete", "cancel"])
def test_a_job_deleted_or_cancelled_while_its_images_are_stored_leaves_no_image(settings, app_factory, engine, small_request, action):
    engine.encode_gate = threading.Event()
    with TestClient(app_factory(settings)) as client:
        job_id = client.post("/jobs", json=small_request()).json()["job_id"]
        wait_for(client, job_id, "running")
        poll(lambda: len(engine.batches), bool, "the batch running (its images then wait for the encoder)")
        answer = client.delete(f"/jobs/{job_id}") if action == "delete" else client.post(f"/jobs/{job_id}/cancel")
        engine.encode_gate.set()
        final = None if action == "delete" else wait_for(client, job_id)
    # leaving the client waited for the encoder to finish

    assert answer.status_code in (200, 204)
    assert not settings.output_dir.exists() or list(settings.output_dir.glob("*.png")) == []
    if final is not None:
        assert final["status"] == "cancelled" and final["result"] is None
