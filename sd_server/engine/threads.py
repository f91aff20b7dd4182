"""Which threads run torch's CPU operations in parallel: on a CPU device, the device thread alone.

torch's CPU build runs each parallel operation on an OpenMP thread team, one team per OS thread that enters a
parallel region, each as large as the machine has cores. Once a second thread (the loader, a request thread that
checks a LoRA) has a team, libgomp counts more threads than cores and stops spinning between regions: the device
thread's workers then sleep and wake at every operation, and a stolen core stalls the whole team. So every other
thread that calls the engine runs torch on itself alone (one OpenMP thread, no team), and the device thread keeps
torch's full team. On CUDA the device's work is not on CPU threads, and loading keeps every core.
"""

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def _openmp_set_num_threads() -> Callable[[int], object] | None:
    """OpenMP's ``omp_set_num_threads`` of the runtime torch loaded (libgomp on Linux), or None where there is none."""
    try:
        return getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    except (OSError, TypeError):  # no process-wide symbol lookup on this platform
        return None


_OPENMP = _openmp_set_num_threads()
_FULL_TEAM = torch.get_num_threads()
_role = threading.local()
_confining = False


def confine(on: bool) -> None:
    """Keep torch's CPU parallelism to the device thread (on a CPU device), or let every thread use it."""
    global _confining
    _confining = on


def set_intra_op_threads(count: int) -> None:
    """Run this thread's torch CPU operations on ``count`` threads (1: no team of its own)."""
    torch.get_num_threads()  # torch sizes a thread's team on its first operation; size it first, so ours stands
    if _OPENMP is not None:
        _OPENMP(count)


def device_work(method: Callable[P, R]) -> Callable[P, R]:
    """An engine method of the device thread: the thread that calls it keeps torch's full team."""

    @functools.wraps(method)
    def on_device_thread(*args: P.args, **kwargs: P.kwargs) -> R:
        if _confining and getattr(_role, "name", None) != "device":
            set_intra_op_threads(_FULL_TEAM)
            _role.name = "device"
        return method(*args, **kwargs)

    return on_device_thread


def side_work(method: Callable[P, R]) -> Callable[P, R]:
    """An engine method other threads call (loading, LoRA checks, unloading): unless the device thread calls it,
    its thread runs torch on itself alone."""

    @functools.wraps(method)
    def beside_device(*args: P.args, **kwargs: P.kwargs) -> R:
        if _confining and getattr(_role, "name", None) is None:
            set_intra_op_threads(1)
            _role.name = "side"
        return method(*args, **kwargs)

    return beside_device
