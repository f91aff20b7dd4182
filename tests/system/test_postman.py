"""The Postman collection, run by newman (Postman's command-line runner) against a fresh server on the demo model:
every request asserts its answer, in an order that creates what later ones need; 0 failures. Skipped, saying why,
where newman is not installed (start.sh --test installs it into .tools/ with npm)."""

import re
import shutil
import subprocess

import pytest

from helpers import DEADLINE_S, PROJECT_DIR, main_server

NEWMAN = PROJECT_DIR / ".tools" / "node_modules" / ".bin" / "newman"


@pytest.fixture
def demo_server(tmp_path):
    """`python main.py` on a copy of the demo model and its LoRA (uploads and trainings write beside them); its URL."""
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
    }
    with main_server(environment) as url:
        yield url


def test_the_postman_collection_runs_under_newman_with_no_failures(demo_server):
    if not NEWMAN.exists():
        pytest.skip("newman is not installed: start.sh --test installs it with npm into .tools/")

    result = subprocess.run(
        [str(NEWMAN), "run", "postman_collection.json", "--env-var", f"baseUrl={demo_server}", "--working-dir", str(PROJECT_DIR),
         "--reporters", "cli", "--color", "off", "--timeout-request", str(DEADLINE_S * 1000)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=DEADLINE_S * 3,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"│\s+assertions\s+│\s+(\d+)\s+│\s+0\s+│", result.stdout), result.stdout[-3000:]
