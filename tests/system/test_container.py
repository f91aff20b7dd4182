"""The service's image as people deploy it: built by docker/build.sh from the Dockerfile, run with `docker run`,
ready and healthy on the demo model, keeping its jobs on a volume across a restart, stopping cleanly on
`docker stop`, and talking to the host's PostgreSQL; compose.yaml validated by Compose itself. Skipped, saying why,
where no Docker engine answers and none can be started here (dockerd, as root)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy
import yaml

from helpers import DEADLINE_S, POSTGRES_URL, PROJECT_DIR, free_port, poll, wait_for, wait_until_healthy

IMAGE = "sd-server:test"
BUILD_DEADLINE_S = 1800  # a cold build downloads and installs every requirement: minutes
LARGEST_IMAGE_BYTES = 2_500_000_000  # a CUDA torch slipping into the CPU image weighs several GB more
SMALL = {"num_inference_steps": 2, "width": 128, "height": 128}


def docker(*arguments: str, timeout: float = DEADLINE_S) -> str:
    """Run a docker command; its standard output, or a failure that shows what it printed."""
    result = subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(arguments)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def engine_answers() -> bool:
    """Whether a Docker engine answers this machine's docker client."""
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine: the one running, or dockerd started here (as root) and stopped after this module."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on this machine (Debian: apt-get install docker.io)")
    if engine_answers():
        yield
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and none can be started here (dockerd, as root)")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = poll(lambda: daemon.poll() is not None or engine_answers(), bool, "dockerd answering", timeout=120, interval=0.5)
        if started and daemon.poll() is not None:
            pytest.skip(f"dockerd could not start here: {log_path.read_text()[-1500:]}")
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def service_image(docker_engine: None) -> dict:
    """The image, built as docker/build.sh builds it (the base made with debootstrap where none can be pulled); its
    configuration as `docker image inspect` shows it."""
    started = time.monotonic()
    result = subprocess.run(
        ["docker/build.sh"], cwd=PROJECT_DIR, env={**os.environ, "SERVER_IMAGE": IMAGE}, capture_output=True, text=True, timeout=BUILD_DEADLINE_S
    )
    assert result.returncode == 0, f"the build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"built {IMAGE} in {time.monotonic() - started:.0f} s")
    return json.loads(docker("image", "inspect", IMAGE))[0]


@dataclass
class Container:
    """A running container of the image, and the URL of its API."""

    name: str
    url: str

    def logs(self) -> str:
        """What the service printed (the end of it)."""
        result = subprocess.run(["docker", "logs", "--tail", "60", self.name], capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def state(self) -> dict:
        """Docker's view of it: Status, ExitCode, Health, ..."""
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name))

    def wait_until_ready(self) -> None:
        """Poll /health/ready until it answers 200; fail with the service's output if the container stops or time runs out."""

        def read() -> int | str:
            status = self.state()["Status"]
            assert status == "running", f"the container is {status}:\n{self.logs()}"
            try:
                return httpx.get(f"{self.url}/health/ready", timeout=5).status_code
            except httpx.TransportError as error:
                return repr(error)

        try:
            poll(read, lambda answer: answer == 200, f"{self.url}/health/ready answering 200", interval=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from error

    def stop(self, grace_s: int = 120) -> None:
        """`docker stop`: SIGTERM, and SIGKILL after ``grace_s``."""
        docker("stop", "--time", str(grace_s), self.name, timeout=grace_s + 60)


@pytest.fixture
def run_container(service_image: dict) -> Iterator:
    """Start containers of the image (``docker run -d``, on a free port of 127.0.0.1 unless on the host's network);
    removes them, and the volumes they named, after the test."""
    names: list[str] = []
    volumes: list[str] = []

    def run(*, volumes_: dict[str, str] | None = None, environment: dict[str, str] | None = None, host_network: bool = False) -> Container:
        name = f"sd-test-{uuid.uuid4().hex[:10]}"
        port = free_port()
        options = ["--network", "host", "-e", f"SD_PORT={port}", "-e", "SD_HOST=127.0.0.1"] if host_network else ["-p", f"127.0.0.1:{port}:8000"]
        for volume, target in (volumes_ or {}).items():
            options += ["-v", f"{volume}:{target}"]
            volumes.append(volume)
        for variable, value in {"SD_RATE_LIMIT": "", **(environment or {})}.items():  # the tests poll: limits have tests of their own
            options += ["-e", f"{variable}={value}"]
        docker("run", "-d", "--name", name, *options, IMAGE)
        names.append(name)
        return Container(name, f"http://127.0.0.1:{port}")

    yield run
    for name in names:
        subprocess.run(["docker", "rm", "--force", "--volumes", name], capture_output=True, timeout=DEADLINE_S)
    for volume in volumes:
        subprocess.run(["docker", "volume", "rm", "--force", volume], capture_output=True, timeout=DEADLINE_S)


def finished_job(url: str, job_id: str) -> dict:
    """Poll the job until it ends; the job."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return wait_for(client, job_id)


def submit(url: str, **fields) -> str:
    """POST /jobs; the new job's id."""
    response = httpx.post(f"{url}/jobs", json={"prompt": "a red circle on a blue background", **SMALL, **fields}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_the_image_runs_unprivileged_with_volumes_a_health_check_and_no_secrets(service_image):
    config = service_image["Config"]
    assert config["User"] == "sd"
    assert set(config["Volumes"]) == {"/models", "/data"}
    assert "/health/ready" in " ".join(config["Healthcheck"]["Test"])
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"][0] == "/usr/bin/tini"  # PID 1 forwards docker stop's SIGTERM
    settings = [variable.split("=", 1)[0] for variable in config["Env"]]
    assert not [name for name in settings if any(word in name for word in ("KEY", "SECRET", "PASSWORD", "TOKEN"))]
    assert "SD_DEFAULT_MODEL=demo" in config["Env"]
    assert service_image["Size"] < LARGEST_IMAGE_BYTES, f"the image weighs {service_image['Size'] / 1e9:.2f} GB"


def test_docker_run_serves_the_demo_model_and_docker_sees_it_healthy(run_container):
    container = run_container()
    container.wait_until_ready()

    response = httpx.post(f"{container.url}/generate", json={"prompt": "a red circle", **SMALL}, timeout=DEADLINE_S)

    assert response.status_code == 200, response.text
    assert response.json()["image_base64"]
    assert docker("exec", container.name, "id", "-u").strip() == "10001"
    poll(lambda: container.state().get("Health", {}).get("Status"), lambda health: health == "healthy", "Docker's health check passing", interval=1)


def test_jobs_survive_a_restart_on_the_data_volume_and_docker_stop_is_clean(run_container):
    container = run_container(volumes_={f"sd-test-data-{uuid.uuid4().hex[:8]}": "/data"})
    container.wait_until_ready()
    done = finished_job(container.url, submit(container.url))
    assert done["status"] == "succeeded", done
    image_url = done["result"]["images"][0]["url"]
    image = httpx.get(f"{container.url}{image_url}", timeout=30).content
    accepted = [submit(container.url, num_inference_steps=20, width=256, height=256), submit(container.url, seed=7)]

    container.stop()

    state = container.state()  # 137 would be docker stop's SIGKILL at the end of its grace period
    assert state["ExitCode"] == 0 and not state["OOMKilled"], f"stopped with {state['ExitCode']}:\n{container.logs()}"
    assert "Application shutdown complete" in container.logs()

    docker("start", container.name)
    container.wait_until_ready()
    assert httpx.get(f"{container.url}/jobs/{done['job_id']}", timeout=30).json()["status"] == "succeeded"
    assert httpx.get(f"{container.url}{image_url}", timeout=30).content == image
    assert [finished_job(container.url, job_id)["status"] for job_id in accepted] == ["succeeded", "succeeded"]


def test_start_sh_docker_builds_and_serves_the_demo_model_until_stopped(service_image, tmp_path: Path):
    volumes = ["sd-models", "sd-data"]
    existing = {volume for volume in volumes if subprocess.run(["docker", "volume", "inspect", volume], capture_output=True).returncode == 0}
    port = free_port()
    environment = {**os.environ, "SERVER_IMAGE": IMAGE, "SD_PORT": str(port)}
    output = (tmp_path / "start.log").open("w")
    process = subprocess.Popen(["./start.sh", "--docker"], cwd=PROJECT_DIR, env=environment, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process, timeout=BUILD_DEADLINE_S)  # the build comes first
        response = httpx.post(f"http://127.0.0.1:{port}/generate/image", json={"prompt": "a red circle", **SMALL}, timeout=DEADLINE_S)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")

        process.send_signal(signal.SIGTERM)  # docker run hands it to the container: the service's graceful shutdown
        assert process.wait(timeout=DEADLINE_S) == 0, (tmp_path / "start.log").read_text()[-3000:]
    finally:
        process.kill()
        output.close()
        for volume in set(volumes) - existing:
            subprocess.run(["docker", "volume", "rm", "--force", volume], capture_output=True, timeout=DEADLINE_S)


@pytest.fixture
def host_postgres_database() -> Iterator[str]:
    """A fresh database on the host's PostgreSQL (the one the other tests use), dropped after; skips without one."""
    name = f"sd_container_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set SD_TEST_POSTGRES_URL): {error.orig}")
    url = sqlalchemy.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_the_image_keeps_its_jobs_in_the_hosts_postgresql(run_container, host_postgres_database):
    container = run_container(environment={"SD_DATABASE_URL": host_postgres_database}, host_network=True)
    container.wait_until_ready()

    job = finished_job(container.url, submit(container.url))

    assert job["status"] == "succeeded", job
    database = sqlalchemy.create_engine(host_postgres_database)
    with database.connect() as connection:
        stored = connection.execute(sqlalchemy.text("SELECT status FROM jobs WHERE id = :id"), {"id": job["job_id"]}).scalar_one()
    database.dispose()
    assert stored == "succeeded"


def compose_command() -> list[str]:
    """Compose as this machine has it: the docker compose plugin, or the standalone docker-compose."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither docker compose nor docker-compose is installed (Debian: apt-get install docker-compose)")


def compose_config(*arguments: str) -> subprocess.CompletedProcess:
    """`compose config` of compose.yaml (and compose.gpu.yaml where asked) with the given options."""
    return subprocess.run([*compose_command(), *arguments, "config"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)


def test_compose_validates_the_stack_with_the_example_env_file(tmp_path: Path):
    result = compose_config("--env-file", ".env.example", "-f", "compose.yaml")
    assert result.returncode == 0, result.stderr

    stack = yaml.safe_load(result.stdout)
    api = stack["services"]["api"]
    assert {name: need["condition"] for name, need in api["depends_on"].items()} == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "minio-bucket": "service_completed_successfully",
    }
    assert all("healthcheck" in stack["services"][name] for name in ("postgres", "redis", "minio"))
    assert api["environment"]["SD_DATABASE_URL"].startswith("postgresql+psycopg://sd:")
    assert set(stack["volumes"]) >= {"models", "data", "postgres", "minio"}
    gpu = compose_config("--env-file", ".env.example", "-f", "compose.yaml", "-f", "compose.gpu.yaml")
    assert gpu.returncode == 0, gpu.stderr
    assert "nvidia/cuda" in yaml.safe_load(gpu.stdout)["services"]["api"]["build"]["args"]["BASE_IMAGE"]


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path):
    empty = tmp_path / "empty.env"
    empty.write_text("")

    result = compose_config("--env-file", str(empty), "-f", "compose.yaml")

    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr or "SD_ADMIN_KEY" in result.stderr or "MINIO_ROOT" in result.stderr


def test_the_container_benchmark_prints_the_build_the_size_the_start_an_image_and_the_stop(service_image, tmp_path: Path):
    figures_path = tmp_path / "container.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_container.py", "--image", IMAGE, "--skip-build", "--requests", "1", "--json", str(figures_path)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=BUILD_DEADLINE_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    figures = json.loads(figures_path.read_text())
    assert figures["image_mb"] == round(service_image["Size"] / 1e6)
    assert figures["ready_s"] > 0 and figures["first_image_s"] > 0 and figures["image_p50_s"] > 0 and figures["memory_mib"] > 0
    assert figures["stop_exit_code"] == 0
