"""The shape of the code: the layer contracts hold, the typed packages pass mypy strict, the top level holds only the
design card's files, and the unit and service tiers run on a Python where neither torch nor Ray can be imported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import DEADLINE_S, PROJECT_DIR

DESIGN_CARD_FILES = {"main.py", "model_service.py", "schemas.py", "config.py", "test_api.py", "demo_model.py"}


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


def test_start_sh_test_runs_the_unit_and_service_tiers_where_torch_cannot_be_imported_then_the_others():
    command = ["./start.sh", "--test", "--collect-only"]

    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=DEADLINE_S)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    torch_free, with_torch = result.stdout.split("torch: importable")
    assert "torch: blocked (tests/torch_free)" in torch_free
    assert "<Dir unit>" in torch_free and "<Dir service>" in torch_free and "<Dir integration>" not in torch_free
    assert "<Dir integration>" in with_torch and "<Dir system>" in with_torch and "<Dir unit>" not in with_torch


def test_the_torch_free_python_refuses_torch_and_ray_and_still_imports_the_app():
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_DIR / "tests" / "torch_free")}
    probe = "import importlib, sd_server.app\nfor name in ('torch', 'diffusers', 'ray.serve'):\n    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError as error:\n        print(error)"

    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("blocked: the unit and service tiers run without it") == 3, result.stdout
