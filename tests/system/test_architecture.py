"""The shape of the code: the layer contracts hold, the typed packages pass mypy strict, the top level holds only the
design card's files, and the unit and service tiers run on a Python where neither torch nor Ray can be imported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEADLINE_S, PROJECT_DIR

DESIGN_CARD_FILES = {"main.py", "model_service.py", "schemas.py", "config.py", "test_api.py", "demo_model.py"}
BLOCK_TORCH = '''
import sys

class BlockTorch:
    """Refuses the packages the unit tier must run without."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "diffusers", "transformers", "peft", "accelerate", "ray"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for the unit tier)")
        return None

sys.meta_path.insert(0, BlockTorch())
'''


def test_the_import_layer_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run([lint_imports], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=DEADLINE_S)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_typed_packages_pass_mypy_strict_and_every_engine_matches_the_engine_protocol():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    result = subprocess.run([mypy], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=DEADLINE_S)  # pyproject.toml

    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout


def test_the_top_level_holds_only_the_design_cards_python_files():
    assert {path.name for path in PROJECT_DIR.glob("*.py")} == DESIGN_CARD_FILES


@pytest.mark.timeout(1800)  # two whole tiers: 2 minutes on an idle machine, over 5 on a slow, busy one
def test_the_unit_and_service_tiers_run_where_torch_and_ray_cannot_be_imported(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "unit or service", "tests/unit", "tests/service", "-p", "no:cacheprovider"]

    result = subprocess.run(command, cwd=PROJECT_DIR, env=environment, capture_output=True, text=True, timeout=1700)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "error" not in result.stdout.splitlines()[-1]
