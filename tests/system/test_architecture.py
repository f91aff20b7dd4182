"""The shape of the code: the layer contracts hold, the top level holds only the design card's files, and the unit
tier runs on a Python where neither torch nor Ray can be imported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_top_level_holds_only_the_design_cards_python_files():
    assert {path.name for path in PROJECT_DIR.glob("*.py")} == DESIGN_CARD_FILES


def test_the_unit_tier_runs_where_torch_and_ray_cannot_be_imported(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "unit", "tests/unit", "-p", "no:cacheprovider"]

    result = subprocess.run(command, cwd=PROJECT_DIR, env=environment, capture_output=True, text=True, timeout=DEADLINE_S)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "error" not in result.stdout.splitlines()[-1]
