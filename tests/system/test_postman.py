"""The Postman collection, run by newman (Postman's command-line runner) against a fresh server on the demo model:
every request asserts its answer, in an order that creates what later ones need; 0 failures. Skipped, saying why,
where newman is not installed (start.sh --test installs it into .tools/ with npm)."""

import re
import shutil
import subprocess

import pytest

from helpers import DEADLINE_S, PROJECT_DIR, main_server

NEWMAN = PROJECT_DIR / ".tools" / "node_modules" / ".bin" / "newman"


@pytest.fixture(params=["auto", "off"])
def demo_server(request, tmp_path):
    """`python main.py` on a copy of the demo model and its LoRA (uploads and trainings write beside them), with keys
    as they come (SD_AUTH=auto: on once the collection makes one) or never required (SD_AUTH=off); its URL."""
    models = tmp_path / "models"
    for name in ("demo", "demo-loras"):
        shutil.copytree(PROJECT_DIR / "models" / name, models / name)
    environment = {
        "SD_DEFAULT_MODEL": "demo",
        "SD_MODELS_DIR": str(models),
        "SD_DATA_DIR": str(tmp_path / "data"),
        "SD_DATABASE_URL": "",
        "SD_OUTPUT_DIR": str(tmp_path / "output"),
        "SD_STYLES_FILE": str(PROJECT_DIR / "models" / "styles.csv"),
        "SD_RATE_LIMIT": "",
        "SD_READ_RATE_LIMIT": "",
        "SD_AUTH": request.param,
    }
    with main_server(environment) as url:
        yield url


def newman(url: str, cwd) -> subprocess.CompletedProcess:
    """One newman run of the collection against ``url``, started in ``cwd`` (the files it uploads are found through
    --working-dir, from any directory)."""
    return subprocess.run(
        [str(NEWMAN), "run", str(PROJECT_DIR / "postman_collection.json"), "--env-var", f"baseUrl={url}", "--working-dir", str(PROJECT_DIR),
         "--reporters", "cli", "--color", "off", "--timeout-request", str(DEADLINE_S * 1000)],
        cwd=cwd, capture_output=True, text=True, timeout=DEADLINE_S * 3,
    )  # fmt: skip


def assert_no_failures(result: subprocess.CompletedProcess) -> None:
    """newman exited 0 and counted no failed assertion."""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"│\s+assertions\s+│\s+(\d+)\s+│\s+0\s+│", result.stdout), result.stdout[-3000:]


def test_the_postman_collection_runs_under_newman_with_no_failures_and_again_on_the_same_server(demo_server, tmp_path):
    if not NEWMAN.exists():
        pytest.skip("newman is not installed: start.sh --test installs it with npm into .tools/")

    first = newman(demo_server, tmp_path)
    again = newman(demo_server, tmp_path)  # the first run's key is revoked at its end: the server is open again

    assert_no_failures(first)
    assert_no_failures(again)
