"""On a CPU device only the device thread runs torch on a thread team: loading, LoRA checks and unloading on other
threads add no OpenMP team, so libgomp never counts more threads than cores and the device's team keeps spinning
between operations (docs/performance.md measures what a second team costs)."""

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from config import Settings
from sd_server.domain.models import CheckpointModel
from sd_server.engine.diffusers_engine import DiffusersEngine
from sd_server.engine.interface import BatchItem, BatchKey

T = TypeVar("T")

TEAM = torch.get_num_threads()  # torch's default, read while collecting: before any engine confined this thread
pytestmark = pytest.mark.skipif(TEAM < 2, reason="one core: torch runs no thread team to keep to one thread")


def native_threads_outside_python() -> set[str]:
    """OS threads of this process that Python did not start (OpenMP workers, tokenizer and library pools)."""
    python = {str(thread.native_id) for thread in threading.enumerate()}
    return set(os.listdir("/proc/self/task")) - python


def on(pool: ThreadPoolExecutor, work: Callable[[], T]) -> T:
    return pool.submit(work).result(timeout=300)


def parallel_work() -> None:
    """Operations large enough that torch runs them on the calling thread's team, if it has one."""
    matrix = torch.randn(512, 512)
    (matrix @ matrix + matrix).sum()


def run_one_image(engine: DiffusersEngine, base: str) -> None:
    key = BatchKey(base, 64, 64, 2, 7.5, None)
    engine.run_batch(key, [BatchItem(CheckpointModel(source=base), "a photo", None, 1, 1)], lambda step, total, previews=None: None, lambda: False)


@pytest.fixture
def engine(settings: Settings) -> DiffusersEngine:
    engine = DiffusersEngine(settings)
    yield engine
    engine.close()


def test_loading_checking_and_unloading_beside_the_device_thread_start_no_thread_team(engine, models_dir: Path):
    demo, demo2 = str(models_dir / "demo"), str(models_dir / "demo2")
    with ThreadPoolExecutor(1) as device, ThreadPoolExecutor(1) as side:
        on(device, lambda: run_one_image(engine, demo))  # the device's own team, and the tokenizer's pool, start here
        before = native_threads_outside_python()

        on(side, lambda: engine.prepare(CheckpointModel(source=demo2)))
        on(side, lambda: engine.check_adapter(demo, models_dir / "loras" / "alice.safetensors"))
        on(side, lambda: engine.unload(demo2))
        on(side, lambda: parallel_work())  # what a big load does: large enough for torch to parallelise
        on(device, lambda: run_one_image(engine, demo))

        assert native_threads_outside_python() - before == set(), "a thread beside the device thread started an OpenMP team"
        assert on(side, torch.get_num_threads) == 1
        assert on(device, torch.get_num_threads) == TEAM


def test_the_check_above_would_see_a_thread_team_started_beside_the_device_thread(engine, models_dir: Path):
    with ThreadPoolExecutor(1) as device:
        on(device, lambda: run_one_image(engine, str(models_dir / "demo")))
    before = native_threads_outside_python()

    with ThreadPoolExecutor(1) as unconfined:  # a thread that never called the engine: torch's defaults
        on(unconfined, parallel_work)
        added = native_threads_outside_python() - before

    assert len(added) == TEAM - 1
