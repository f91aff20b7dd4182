"""Image storage: S3 over real HTTP against a local S3-compatible server, and storage failures."""

import hashlib

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from helpers import free_port, wait_for
from sd_server.app import create_app


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    """moto's S3-compatible server on a free local port, for real HTTP round trips."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


@pytest.fixture
def s3_settings(settings, s3_endpoint, monkeypatch, request):
    """Settings that store images in a fresh bucket of the local S3 server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings.storage, settings.s3_endpoint_url, settings.s3_region = "s3", s3_endpoint, "us-east-1"
    settings.s3_bucket, settings.s3_prefix = f"images-{request.node.name[-20:].lower().replace('_', '-')}", "sd/"
    return settings


def s3_client(settings):
    """A boto3 client of the test server."""
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)


def test_s3_round_trip_through_a_presigned_url_fetched_over_http(s3_settings, small_request):
    s3_client(s3_settings).create_bucket(Bucket=s3_settings.s3_bucket)
    with TestClient(create_app(s3_settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])
        redirect = client.get(f"/images/{job['result']['image_url'].split('?')[0].rsplit('/', 1)[1]}", follow_redirects=False)

    url = job["result"]["image_url"]
    assert url.startswith(s3_settings.s3_endpoint_url) and "Signature" in url
    assert job["result"]["image_path"] is None
    png = httpx.get(url).content
    assert png.startswith(b"\x89PNG")
    key = url.split("?")[0].rsplit("/", 1)[1]
    stored = s3_client(s3_settings).get_object(Bucket=s3_settings.s3_bucket, Key=f"sd/{key}")
    assert stored["Body"].read() == png and stored["ContentType"] == "image/png"
    assert redirect.status_code == 307 and httpx.get(redirect.headers["location"]).content == png


def test_deleting_a_job_deletes_its_s3_objects(s3_settings, small_request):
    s3 = s3_client(s3_settings)
    s3.create_bucket(Bucket=s3_settings.s3_bucket)
    with TestClient(create_app(s3_settings)) as client:
        job = wait_for(client, client.post("/jobs", json=small_request(num_images=2)).json()["job_id"])
        assert s3.list_objects_v2(Bucket=s3_settings.s3_bucket).get("KeyCount") == 2

        assert client.delete(f"/jobs/{job['job_id']}").status_code == 204

    assert s3.list_objects_v2(Bucket=s3_settings.s3_bucket).get("KeyCount") == 0


def test_missing_bucket_fails_the_job_clearly_and_the_worker_goes_on(s3_settings, small_request):
    with TestClient(create_app(s3_settings)) as client:
        failed = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])
        s3_client(s3_settings).create_bucket(Bucket=s3_settings.s3_bucket)
        succeeded = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])

    assert failed["status"] == "failed"
    assert s3_settings.s3_bucket in failed["error"] and "NoSuchBucket" in failed["error"]
    assert succeeded["status"] == "succeeded"


def test_unwritable_output_dir_fails_the_job_clearly_and_the_worker_goes_on(settings, small_request):
    settings.output_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.output_dir.write_text("a file where the image folder should be")  # writes fail, even as root
    with TestClient(create_app(settings)) as client:
        failed = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])
        sync = client.post("/generate", json=small_request())
        settings.output_dir.unlink()
        succeeded = wait_for(client, client.post("/jobs", json=small_request()).json()["job_id"])

    assert failed["status"] == "failed" and "SD_OUTPUT_DIR" in failed["error"]
    assert sync.status_code == 500 and "SD_OUTPUT_DIR" in sync.json()["detail"]
    assert succeeded["status"] == "succeeded"


def test_stored_image_checksum_and_size_match_the_file(client, small_request, settings):
    job_id = client.post("/jobs", json=small_request()).json()["job_id"]
    wait_for(client, job_id)

    image = client.app.state.services.jobs.get(job_id).images[0]
    data = (settings.output_dir / image.key).read_bytes()
    assert image.size_bytes == len(data) and image.sha256 == hashlib.sha256(data).hexdigest()
