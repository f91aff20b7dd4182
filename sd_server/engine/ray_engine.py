"""The engine of SD_ENGINE=ray. This process keeps the job queue, which batches as before; each batch runs on a Ray
Serve replica chosen by its base checkpoint (Serve's model multiplexing), its progress streamed back step by step,
cancelled by cancelling the stream. A batch whose replica dies runs once more, on a live replica."""

import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from config import Settings
from sd_server.domain.models import LoraModel, UserModel
from sd_server.domain.trainings import TrainingSettings
from sd_server.engine.devices import CPU_MAX_BATCH_SIZE, CUDA_MAX_BATCH_SIZE
from sd_server.engine.interface import BatchItem, BatchKey, BatchOutput, EngineReport, StepCallback, Stop, TrainingRun
from sd_server.engine.png import with_parameters
from sd_server.engine.prompts import PromptCounter
from sd_server.engine.ray_replica import APP_NAME, Finished, Progress, ReplicaState, Started, engine_application
from sd_server.engine.ray_training import RemoteTraining
from sd_server.errors import GenerationFailedError, ServiceUnavailableError, first_line

logger = logging.getLogger(__name__)
PROJECT_DIR = Path(__file__).resolve().parents[2]
REPLICA_LOST = (RayActorError, ActorUnavailableError)  # the replica's process (or its node) died: ActorDiedError too
TIERS = ("device", "cpu")
BROADCAST_TIMEOUT_S = 60  # an unload on every replica waits for the batch each one is running


@dataclass
class ReplicaStats:
    """What this process knows of one replica: its process, what it ran, and its engine's last report."""

    pid: int
    alive: bool = True
    running: int = 0  # batches on it now
    batches: int = 0
    jobs: int = 0
    jobs_loading: int = 0  # jobs whose batch had to load its base on this replica first
    jobs_by_model: Counter = field(default_factory=Counter)  # base checkpoint -> jobs
    report: EngineReport | None = None


class RayEngine:
    """Runs batches on the Serve replicas of the ``sd-engine`` application, which it deploys (SD_RAY_DEPLOY) on the
    Ray cluster it joins (SD_RAY_ADDRESS) or starts; counts where jobs ran and whether their model was there."""

    device = "ray"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_ray = connect(settings)
        self.num_gpus = settings.ray_num_gpus if settings.ray_num_gpus is not None else float(bool(ray.cluster_resources().get("GPU")))
        self.default_max_batch_size = CUDA_MAX_BATCH_SIZE if self.num_gpus else CPU_MAX_BATCH_SIZE
        self.parallel_batches = (settings.ray_autoscaling or {}).get("max_replicas", settings.ray_replicas)
        self.handle = deploy(settings, self.num_gpus)
        self.prompt_counter = PromptCounter(settings.models_dir)
        self.replicas: dict[str, ReplicaStats] = {}
        self.reruns = 0
        self.batches_mixing_bases = 0  # batches a replica received with items of another base than it was routed by
        self._lock = threading.Lock()

    # --- queries -----------------------------------------------------------------------------------------

    def is_ready(self, model: UserModel) -> bool:
        """Always: a replica loads what its batch needs (Serve routes to one holding it when it can)."""
        return True

    def needs_loading(self, model: UserModel) -> bool:
        """Never: loading happens on the replicas, not in this process's loader."""
        return False

    def prompt_chunks(self, base: str, texts: list[str]) -> int:
        """How many 75-token chunks the longest of ``texts`` takes with ``base``'s tokenizer (read here)."""
        return self.prompt_counter.chunks(base, texts)

    def loaded_models(self) -> list[str]:
        """Checkpoints the live replicas reported holding after their last batch."""
        return merged_report(self._live_reports())["loaded_models"]

    def report(self) -> EngineReport:
        """The replicas' reports merged (device ``ray``), and under ``cache.ray`` where jobs ran."""
        report = merged_report(self._live_reports(), self.settings.dtype)
        report["cache"]["ray"] = self.placement()
        return report

    def placement(self) -> dict:
        """Per replica: its process, batches and jobs run, jobs that waited for a load; the fraction of jobs that
        did not, and the batches run again after their replica died."""
        with self._lock:
            jobs = sum(stats.jobs for stats in self.replicas.values())
            loading = sum(stats.jobs_loading for stats in self.replicas.values())
            return {
                "replicas": {
                    replica_id: {
                        "pid": stats.pid, "alive": stats.alive, "running": stats.running, "batches": stats.batches,
                        "jobs": stats.jobs, "jobs_loading": stats.jobs_loading, "jobs_by_model": dict(stats.jobs_by_model),
                    }  # fmt: skip
                    for replica_id, stats in self.replicas.items()
                },
                "jobs": jobs,
                "jobs_without_load": round(1 - loading / jobs, 4) if jobs else None,
                "batches_mixing_bases": self.batches_mixing_bases,
                "reruns": self.reruns,
            }

    # --- loading -----------------------------------------------------------------------------------------

    def prepare(self, model: UserModel, keep: Set[str] = frozenset()) -> bool:
        """Load ``model``'s base on a replica (the default model at start-up: readiness follows it)."""
        with replica_errors():
            self._record(self.handle.options(multiplexed_model_id=model.base).prepare.remote(model).result())
        return True

    def check_adapter(self, base: str, path: Path) -> None:
        """Raise InvalidAdapterError unless the LoRA at ``path`` loads onto ``base`` on a replica (the models folder
        is shared with the replicas: one machine, or a shared volume)."""
        with replica_errors():
            self.handle.options(multiplexed_model_id=base).check_adapter.remote(base, str(path.resolve())).result()

    def unload(self, source: str | None = None) -> list[str]:
        """Drop one checkpoint (or all) from every replica's memory; the ones dropped anywhere."""
        return sorted({name for dropped in self._broadcast("unload", source) for name in dropped})

    def unload_adapter(self, model: LoraModel) -> bool:
        """Take ``model``'s LoRA off its base on every replica; True when one had it loaded."""
        return any(self._broadcast("unload_adapter", model))

    def free_memory(self) -> None:
        """Nothing to free here: the replicas hold the memory."""

    def close(self) -> None:
        """Stop the Ray this engine started, its replicas with it; leave a cluster it joined running."""
        if self.started_ray:
            ray.shutdown()

    # --- running -----------------------------------------------------------------------------------------

    def run_batch(
        self, key: BatchKey, items: list[BatchItem], on_step: StepCallback, should_stop: Callable[[], Stop]
    ) -> BatchOutput | None:
        """Run the batch on a replica holding the key's base (or the least loaded one); once more on another replica
        when the first one dies. None when ``should_stop()`` said to stop after a step: a replica's stream carries no
        word back, so ``finish`` stops it as ``discard`` does."""
        for attempt in (1, 2):
            try:
                return self._run_on_replica(key, items, on_step, should_stop)
            except REPLICA_LOST as error:
                if attempt == 2:
                    raise GenerationFailedError(
                        "the Ray replicas that ran this batch died twice; the Ray logs (ray logs, or the dashboard) say why",
                        detail=first_line(error),
                    ) from error
                with self._lock:
                    self.reruns += 1
                logger.warning("the replica running a batch of %d jobs on %s died (%s); running it again", len(items), key.base, first_line(error))
        return None

    def encode(self, images: list[bytes], texts: list[str]) -> list[bytes]:
        """Each image (a PNG the replica encoded) with its text added as the ``parameters`` chunk."""
        return [with_parameters(png, text) for png, text in zip(images, texts)]

    def start_training(self, base: str, photos: list[Path], settings: TrainingSettings) -> TrainingRun:
        """A LoRA training in a Ray actor of its own, with the devices of one replica."""
        return RemoteTraining(self.settings, self.num_gpus, base, photos, settings)

    def _run_on_replica(
        self, key: BatchKey, items: list[BatchItem], on_step: StepCallback, should_stop: Callable[[], Stop]
    ) -> BatchOutput | None:
        """One attempt: stream the batch's events from the replica Serve picks."""
        stream = self.handle.options(stream=True, multiplexed_model_id=key.base).run.remote(key, items)
        replica: ReplicaStats | None = None
        try:
            with replica_errors():
                for event in stream:
                    if isinstance(event, Started):
                        replica = self._started(event, key.base, len(items))
                    elif isinstance(event, Progress):
                        on_step(event.step, event.total, event.previews)
                        if should_stop():
                            stream.cancel()
                            return None
                    elif isinstance(event, Finished):
                        self._record(event.state)
                        return event.output
        except REPLICA_LOST:
            if replica is not None:
                replica.alive = False
            raise
        finally:
            if replica is not None:
                with self._lock:
                    replica.running -= 1
        raise GenerationFailedError("the replica's stream ended before the batch did; the Ray logs say why")

    def _broadcast(self, method: str, *arguments: object) -> list:
        """Call ``method`` on every live replica (Serve's broadcast); the answers of those that answered in time,
        each replica's state recorded."""
        answers = self.handle.broadcast(method, *arguments).results(timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)
        results = []
        for answer in answers:
            if isinstance(answer, Exception):
                logger.warning("a replica did not answer %s: %s", method, first_line(answer))
                continue
            result, state = answer
            self._record(state)
            results.append(result)
        return results

    def _record(self, state: ReplicaState) -> None:
        """Keep what a replica reported holding."""
        with self._lock:
            self.replicas.setdefault(state.replica_id, ReplicaStats(state.pid)).report = state.report

    def _started(self, event: Started, base: str, jobs: int) -> ReplicaStats:
        """Count the batch on its replica: its jobs, whether they waited for a load, and a batch of other bases."""
        with self._lock:
            stats = self.replicas.setdefault(event.replica_id, ReplicaStats(event.pid))
            stats.running += 1
            stats.batches += 1
            stats.jobs += jobs
            stats.jobs_loading += jobs if event.needed_load else 0
            stats.jobs_by_model[base] += jobs
            self.batches_mixing_bases += event.bases != (base,)
            return stats

    def _live_reports(self) -> list[EngineReport]:
        """The last reports of the replicas not known dead."""
        with self._lock:
            return [stats.report for stats in self.replicas.values() if stats.alive and stats.report]


@contextmanager
def replica_errors() -> Iterator[None]:
    """A replica's own error (a ServiceError, say) raised here as itself, not wrapped in Ray's task error."""
    try:
        yield
    except RayTaskError as error:
        cause = error.cause
        if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
            raise cause from None
        raise


def connect(settings: Settings) -> bool:
    """Join the cluster at SD_RAY_ADDRESS, or start a local Ray when it is unset (True: this process started it).
    Replicas import this project from its folder (the same path on every node, as in the container image)."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"PYTHONPATH": str(PROJECT_DIR)}}
    try:
        with own_signal_handlers():
            if settings.ray_address:
                ray.init(address=settings.ray_address, namespace="sd-server", runtime_env=runtime_env)
                return False
            ray.init(address="local", namespace="sd-server", runtime_env=runtime_env, include_dashboard=False)
            return True
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ServiceUnavailableError(
            f"could not reach the Ray cluster at SD_RAY_ADDRESS={settings.ray_address!r}; start it with `ray start --head` "
            "or unset SD_RAY_ADDRESS for a local one",
            detail=first_line(error),
        ) from error


@contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Keep this process's SIGTERM and SIGINT handlers (uvicorn's graceful shutdown) through ``ray.init``, which
    replaces them with one that exits at once and abseil's, which aborts the process 3 s into a graceful shutdown
    (ray-project/ray#64830). Only the main thread may set handlers; the server starts Ray there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            if handler is not None:
                signal.signal(number, handler)


def deploy(settings: Settings, num_gpus: float) -> DeploymentHandle:
    """Deploy the engine replicas (SD_RAY_DEPLOY), or find the ones a RayService deployed; a handle to them."""
    if not settings.ray_deploy:
        return serve.get_app_handle(APP_NAME)
    serve.start(proxy_location="Disabled")  # requests come through handles from this process, not Serve's HTTP
    return serve.run(engine_application(settings, num_gpus), name=APP_NAME, route_prefix=None)


def merged_report(reports: list[EngineReport], dtype: str = "auto") -> EngineReport:
    """Several replicas' reports as one: models in any replica, figures summed (``dtype`` until one reports)."""
    tiers = {tier: merged_counts([report["cache"][tier] for report in reports], "models") for tier in TIERS}
    adapters = merged_counts([report["cache"]["adapters"] for report in reports], "resident")
    adapters.setdefault("max_adapters", 0)
    for tier in TIERS:
        tiers[tier].setdefault("budget_bytes", 0)
    cache: dict[str, Any] = {**tiers, "adapters": adapters, "shared_components": sum(r["cache"]["shared_components"] for r in reports)}
    return EngineReport(
        device="ray",
        dtype=reports[0]["dtype"] if reports else dtype,
        loaded_models=list(dict.fromkeys(model for report in reports for model in report["loaded_models"])),
        cache=cache,
        device_memory_bytes=sum(report["device_memory_bytes"] for report in reports),
        device_memory_peak_bytes=max((report["device_memory_peak_bytes"] for report in reports), default=0),
        compile=merged_compile([report["compile"] for report in reports]),
    )


def merged_compile(parts: list[dict]) -> dict:
    """Several replicas' SD_COMPILE figures: their settings (the same everywhere), the compile counts and seconds summed."""
    if not parts:
        return {"enabled": False}
    summed = ("compiles", "compile_seconds", "compiles_on_requests", "lora_batches_uncompiled")
    return {**parts[0], **{name: sum(part[name] for part in parts) for name in summed}}


def merged_counts(parts: list[dict], listed: str) -> dict:
    """Figures of several replicas: the ``listed`` names joined, numbers summed (``max_adapters``: the same)."""
    merged: dict[str, Any] = {listed: [], "bytes": 0, "hits": 0, "misses": 0, "evictions": 0, "load_seconds": 0.0}
    for part in parts:
        for name, value in part.items():
            if name == listed:
                merged[name] = list(dict.fromkeys(merged[name] + value))
            elif name == "max_adapters":
                merged[name] = value
            else:
                merged[name] = merged.get(name, 0) + value
    return merged
