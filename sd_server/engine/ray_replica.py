"""The Ray Serve side of SD_ENGINE=ray: each replica owns one device with its own diffusers engine (model cache,
LoRAs, batched pipeline calls). Serve multiplexes the replicas by base checkpoint, so a batch goes to a replica that
already holds its base when one is free, and Serve unloads a replica's least recently used base past
SD_RAY_MODELS_PER_REPLICA."""

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from config import Settings
from sd_server.domain.models import CheckpointModel, LoraModel, UserModel
from sd_server.engine.diffusers_engine import DiffusersEngine
from sd_server.engine.interface import BatchItem, BatchKey, BatchOutput, EngineReport, Stop
from sd_server.engine.png import encode_png
from sd_server.errors import DeviceLostError, ModelLoadError

logger = logging.getLogger(__name__)
APP_NAME = "sd-engine"


@dataclass(frozen=True)
class Started:
    """A replica took the batch: which replica (and its process), the bases of the batch's items as the replica
    received them (one: the request's model id), and whether that base had to be loaded."""

    replica_id: str
    pid: int
    bases: tuple[str, ...]
    needed_load: bool


@dataclass(frozen=True)
class Progress:
    """A denoising step of the batch ended (on preview steps, with a JPEG of each image)."""

    step: int
    total: int
    previews: list[bytes] | None = None


@dataclass(frozen=True)
class ReplicaState:
    """What a replica holds now (its engine's report), and which replica (and process) it is."""

    replica_id: str
    pid: int
    report: EngineReport


@dataclass(frozen=True)
class Finished:
    """The batch's images (None: it stopped), and the replica's state after it."""

    output: BatchOutput | None
    state: ReplicaState


class LoadedBase:
    """A base checkpoint in a replica's engine, as Serve's multiplexing holds it: when Serve lets it go, it leaves
    the engine's cache (once, whoever calls ``__del__``)."""

    def __init__(self, engine: DiffusersEngine, base: str) -> None:
        self.engine, self.base, self.released = engine, base, False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self.engine.unload(self.base)


async def load_base(replica: "EngineReplica", base: str) -> LoadedBase:
    """Serve's multiplexed loader: bring ``base`` onto the replica's device."""
    if not await asyncio.to_thread(replica.engine.prepare, CheckpointModel(source=base)):
        raise ModelLoadError(f"no room on the replica's device for model '{base}'; raise SD_CACHE_DEVICE_GB")
    return LoadedBase(replica.engine, base)


class EngineReplica:
    """One Serve replica: a diffusers engine on the replica's device, its multiplexed models the base checkpoints."""

    def __init__(self, settings: dict[str, Any], models_per_replica: int) -> None:
        self.engine = DiffusersEngine(Settings(_env_file=None, **settings))
        # Batches run on one thread, the replica's device thread: on a CPU device only it keeps torch's thread team.
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica-device")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.load_base = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load_base)

    async def run(self, key: BatchKey, items: list[BatchItem]) -> AsyncIterator[Started | Progress | Finished]:
        """Run one batch on the key's base (the request's multiplexed model id), streaming Started, a Progress per
        step, then Finished. A client that cancels the stream stops the batch after its current step."""
        needed_load = not self.engine.is_ready(CheckpointModel(source=key.base))
        await self.load_base(self, key.base)
        yield Started(self.replica_id, os.getpid(), tuple(sorted({item.model.base for item in items})), needed_load)
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        loop = asyncio.get_running_loop()

        def should_stop() -> Stop:
            return Stop.discard if stop.is_set() else Stop.go

        asyncio.ensure_future(loop.run_in_executor(self._device_thread, self._run_batch, key, items, self._sender(events), should_stop))
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            stop.set()  # a cancelled stream ends here: the batch's thread stops after its step

    async def prepare(self, model: UserModel) -> ReplicaState:
        """Load ``model``'s base (and read its LoRA ahead) on this replica; its state after."""
        await self.load_base(self, model.base)
        await asyncio.to_thread(self.engine.prepare, model)
        return self.state()

    async def unload(self, source: str | None) -> tuple[list[str], ReplicaState]:
        """Drop one base (or all) from this replica's memory (Serve still routes that base here first: a batch for
        it loads it again); the bases dropped, and the state after."""
        return await asyncio.to_thread(self.engine.unload, source), self.state()

    async def unload_adapter(self, model: LoraModel) -> tuple[bool, ReplicaState]:
        """Take ``model``'s LoRA off its base here; whether it was loaded, and the state after."""
        return await asyncio.to_thread(self.engine.unload_adapter, model), self.state()

    def state(self) -> ReplicaState:
        """This replica's identity and its engine's report now."""
        return ReplicaState(self.replica_id, os.getpid(), self.engine.report())

    async def check_adapter(self, base: str, path: str) -> None:
        """Raise InvalidAdapterError unless the LoRA file at ``path`` loads onto ``base`` (a shared file system)."""
        await self.load_base(self, base)
        await asyncio.to_thread(self.engine.check_adapter, base, Path(path))

    def _sender(self, events: asyncio.Queue) -> Callable[[object], None]:
        """A function the batch's thread hands events to the replica's event loop with."""
        loop = asyncio.get_running_loop()
        return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)

    def _run_batch(self, key: BatchKey, items: list[BatchItem], send: Callable[[object], None], should_stop: Callable[[], Stop]) -> None:
        """The batch on the engine, in a thread; its end sent as Finished. A lost device ends this replica's process
        (Serve starts another, and the client runs the batch again); other errors go back to the client."""
        try:
            output = self.engine.run_batch(key, items, lambda step, total, previews=None: send(Progress(step, total, previews)), should_stop)
        except DeviceLostError:
            logger.critical("the device is lost; this replica ends, Serve starts a fresh one", exc_info=True)
            os._exit(70)
        except Exception as error:
            send(error)
            return
        send(Finished(output and encoded(output), self.state()))


def encoded(output: BatchOutput) -> BatchOutput:
    """The batch's images as PNG bytes: compressed here, on the replica's cores, not in the API process (which adds
    each image's parameters chunk)."""
    return BatchOutput([[encode_png(image) for image in images] for images in output.images], output.scheduler)


def engine_application(settings: Settings, num_gpus: float) -> serve.Application:
    """The Serve application of the engine replicas, from the service's settings (paths made absolute)."""
    payload = settings.model_dump(mode="json", exclude={"user_models"})
    for name in ("models_dir", "output_dir", "data_dir"):
        payload[name] = str(Path(payload[name]).resolve())
    scaling: dict[str, Any] = (
        {"autoscaling_config": settings.ray_autoscaling} if settings.ray_autoscaling else {"num_replicas": settings.ray_replicas}
    )
    deployment = serve.deployment(EngineReplica, name="EngineReplica").options(
        max_ongoing_requests=1,  # one batch per device at a time: the queue in front batches, Serve routes
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": settings.ray_num_cpus},
        **scaling,
    )
    return deployment.bind(payload, settings.ray_models_per_replica)


def app_builder(arguments: dict[str, str]) -> serve.Application:
    """For a RayService's serveConfigV2 (``import_path: sd_server.engine.ray_replica:app_builder``): the engine
    replicas from the SD_* variables of the Ray pods, ``num_gpus`` from the arguments (default 1)."""
    settings = Settings()
    return engine_application(settings, float(arguments.get("num_gpus", settings.ray_num_gpus or 1)))
