"""The deployment files agree with the service and with each other: every SD_ variable they set is a setting, every
secret compose asks for is in the example env file, and the CUDA image is the tested Dockerfile with other build
arguments, not a second file."""

import re

import pytest
import yaml

from config import Settings
from helpers import PROJECT_DIR

DEPLOY_FILES = ["Dockerfile", "compose.yaml", "compose.gpu.yaml", ".env.example", "docs/kuberay-rayservice.yaml"]
SETTINGS = {f"SD_{name.upper()}" for name in Settings.model_fields}
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(:?[-?])?[^}]*\}")


def env_example() -> dict[str, str]:
    """The variables of .env.example and their values."""
    lines = (PROJECT_DIR / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def compose_text() -> str:
    """compose.yaml and compose.gpu.yaml, together."""
    return (PROJECT_DIR / "compose.yaml").read_text() + (PROJECT_DIR / "compose.gpu.yaml").read_text()


@pytest.mark.parametrize("name", DEPLOY_FILES)
def test_every_sd_variable_a_deploy_file_names_is_a_setting(name: str):
    named = set(re.findall(r"\bSD_[A-Z0-9_]*[A-Z0-9]\b", (PROJECT_DIR / name).read_text()))

    assert named - SETTINGS == set()


def test_the_example_env_file_holds_every_variable_compose_requires_and_nothing_compose_ignores():
    example = env_example()
    used = {match.group(1) for match in COMPOSE_VARIABLE.finditer(compose_text())}
    required = {match.group(1) for match in COMPOSE_VARIABLE.finditer(compose_text()) if match.group(2) == ":?"}

    assert required - set(example) == set()
    assert set(example) - used - {"COMPOSE_PROFILES"} == set()
    assert all(value for value in example.values())


def test_the_example_secrets_say_they_must_be_changed():
    secrets = {name: value for name, value in env_example().items() if re.search("KEY|SECRET|PASSWORD", name)}

    assert secrets and all(value.startswith("change-me") for value in secrets.values())


def test_the_cuda_image_is_the_same_dockerfile_with_other_build_arguments():
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    declared = set(re.findall(r"^ARG ([A-Z_]+)", dockerfile, re.MULTILINE))
    gpu = yaml.safe_load((PROJECT_DIR / "compose.gpu.yaml").read_text())

    builds = [service["build"] for service in gpu["services"].values() if "build" in service]

    assert builds and all("dockerfile" not in build and build["context"] == "." for build in builds)
    assert all(set(build["args"]) <= declared for build in builds)
    assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= set(builds[0]["args"])


def test_the_kuberay_manifest_mounts_the_volumes_where_the_image_keeps_its_state():
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    volumes = set(re.findall(r'"(/[a-z]+)"', re.search(r"^VOLUME \[(.*)\]", dockerfile, re.MULTILINE).group(1)))
    manifest = yaml.safe_load((PROJECT_DIR / "docs" / "kuberay-rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]

    for pod in pods:
        assert {mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]} == volumes
        assert pod["securityContext"]["fsGroup"] == 10001


def test_every_api_container_gets_longer_to_stop_than_the_service_waits_for_its_running_batch():
    shutdown_s = Settings.model_fields["shutdown_timeout_s"].default
    compose = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())
    manifest = yaml.safe_load((PROJECT_DIR / "docs" / "kuberay-rayservice.yaml").read_text())
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]

    for name in ("api", "ray-head"):
        assert int(compose["services"][name]["stop_grace_period"].removesuffix("s")) > shutdown_s
    assert head["terminationGracePeriodSeconds"] > shutdown_s
