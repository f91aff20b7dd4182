"""Prometheus metrics: HTTP traffic, the queue and its jobs, batches, steps, images, the model cache, memory."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CACHE_SERIES = (
    ("sd_model_cache_hits", "hits", "Batches whose model was in this tier (adapters: already loaded)."),
    ("sd_model_cache_misses", "misses", "Models brought into this tier (adapters: loaded)."),
    ("sd_model_cache_evictions", "evictions", "Models moved out of this tier (adapters: removed)."),
    ("sd_model_load_seconds_sum", "load_seconds", "Seconds spent bringing models into this tier."),
    ("sd_model_cache_bytes", "bytes", "Bytes of weights resident in this tier."),
)


class Metrics:
    """The service's series, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sd_http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sd_http_request_duration_seconds", "HTTP request latency.", ["method", "route"], registry=self.registry
        )
        self.jobs_finished = Counter("sd_jobs_finished", "Jobs that ended, by final state.", ["status"], registry=self.registry)
        self.batch_size = Histogram(
            "sd_batch_size_images", "Images per pipeline call.", buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=self.registry
        )
        self.step_seconds = Histogram(
            "sd_step_seconds", "Seconds per denoising step of a batch.", buckets=(0.01, 0.03, 0.1, 0.3, 1, 3), registry=self.registry
        )
        self.images = Counter("sd_images_generated", "Images generated.", registry=self.registry)
        self.wait_seconds = Histogram(
            "sd_job_wait_seconds",
            "Seconds from submission to the first step, by priority class.",
            ["priority"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self._watched: _StateCollector | None = None

    def watch(self, queue_stats: Callable[[], dict], engine_report: Callable[[], dict]) -> None:
        """Read the queue's figures and the engine's report (cache, loaded models, device memory) at every scrape;
        a later call (the app started again) replaces the services read before."""
        if self._watched is not None:
            self.registry.unregister(self._watched)
        self._watched = _StateCollector(queue_stats, engine_report)
        self.registry.register(self._watched)

    def batch_ran(self, images: int, seconds: float, steps: int) -> None:
        """Observe one finished pipeline call."""
        self.batch_size.observe(images)
        self.step_seconds.observe(seconds / max(steps, 1))
        self.images.inc(images)

    def job_started(self, priority: str, waited_s: float) -> None:
        """Observe how long a job waited in the queue."""
        self.wait_seconds.labels(priority).observe(waited_s)

    def job_finished(self, status: str) -> None:
        """Count a job that ended."""
        self.jobs_finished.labels(status).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read when scraped: queue depth, active jobs by state, model cache figures, device memory."""

    def __init__(self, queue_stats: Callable[[], dict], engine_report: Callable[[], dict]) -> None:
        self.queue_stats, self.engine_report = queue_stats, engine_report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.queue_stats()
        yield GaugeMetricFamily("sd_queue_depth", "Jobs waiting in the queue.", value=stats["queued"])
        active = GaugeMetricFamily("sd_jobs_active", "Jobs not yet ended, by state.", labels=["state"])
        active.add_metric(["queued"], stats["queued"])
        active.add_metric(["running"], stats["running"])
        yield active
        by_user = GaugeMetricFamily("sd_queue_depth_by_user", "Jobs waiting in the queue, per user with any.", labels=["user"])
        for user, depth in stats["queued_by_user"].items():
            by_user.add_metric([user], depth)
        yield by_user
        shares = GaugeMetricFamily(
            "sd_tenant_share", "Each tenant's share of the pixel-steps served since the start.", labels=["tenant"]
        )
        for tenant, share in stats["tenant_shares"].items():
            shares.add_metric([tenant], share)
        yield shares
        report = self.engine_report()
        for name, key, help_text in CACHE_SERIES:
            family = GaugeMetricFamily(name, help_text, labels=["tier"])
            for tier in ("device", "cpu", "adapters"):
                family.add_metric([tier], report["cache"][tier][key])
            yield family
        yield GaugeMetricFamily("sd_models_loaded", "Checkpoints in memory now.", value=len(report["loaded_models"]))
        yield GaugeMetricFamily(
            "sd_device_memory_allocated_bytes", "Device memory in use (0 on CPU).", value=report["device_memory_bytes"]
        )
