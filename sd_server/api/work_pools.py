"""Thread pools of their own for request work whose length the client controls: decoding uploaded pictures and zips,
and resolving webhook hosts. However many such requests arrive, at most a pool's threads run them and the rest wait
their turn there, so the threads that serve every other request (the default executor) never wait for them."""

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
WEBHOOK_LOOKUP_THREADS = 4  # DNS lookups wait on the network, not on the CPU


class WorkPool:
    """A bounded pool of named threads; ``run`` awaits a function on it, the request id's context carried along."""

    def __init__(self, name: str, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` on one of the pool's threads, once one is free."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: context.run(function, *args, **kwargs))

    def shutdown(self) -> None:
        """Stop taking work; what waits is dropped (its requests are ending with the server)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
