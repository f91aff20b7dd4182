"""The dispatcher: what the worker threads ask of the queue. It hands out the scheduler's batches and loads, moves
running jobs through the lifecycle (progress, cancel, timeout, success, failure, a lost device), counts batches, and
stores and announces each change through the one writer, outside the queue's condition."""

import base64
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from config import Settings
from sd_server.domain.jobs import Job, JobStatus, StoredImage
from sd_server.engine.interface import Engine, Stop
from sd_server.errors import JobTimeoutError, ServiceError, ServiceUnavailableError
from sd_server.jobs.admission import Backlog
from sd_server.jobs.batching import images_in
from sd_server.jobs.events import BatchRan, EventBus
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.scheduler import DeviceUsage, ModelToLoad, Turn
from sd_server.jobs.writer import Writer
from sd_server.observability.liveness import Readiness


@dataclass
class BatchStats:
    """Batches run so far, and a moving average of a batch's seconds (for Retry-After)."""

    batches: int = 0
    mixed_batches: int = 0  # batches whose jobs ran on more than one model (different LoRAs on one base)
    images: int = 0
    seconds_per_batch: float = 1.0
    seconds_per_cost: float | None = None  # a pixel-step's seconds, once a batch ran

    def count(self, batch: list[Job], seconds: float) -> None:
        """Count one batch that took ``seconds``."""
        self.batches += 1
        self.mixed_batches += len({job.model for job in batch}) > 1
        self.images += images_in(batch)
        self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * seconds
        per_cost = seconds / max(1, sum(job.cost for job in batch))
        self.seconds_per_cost = per_cost if self.seconds_per_cost is None else 0.8 * self.seconds_per_cost + 0.2 * per_cost


def running_in(batch: list[Job]) -> list[Job]:
    """The jobs of ``batch`` still running (call under the queue's lock)."""
    return [job for job in batch if job.status is JobStatus.running]


def data_url(jpeg: bytes) -> str:
    """A JPEG as a data URL, as SSE progress events carry previews."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class Dispatcher:
    """The queue as the loader, the device threads and the encoder use it."""

    def __init__(self, settings: Settings, queue: JobQueue, engine: Engine, writer: Writer, bus: EventBus, readiness: Readiness) -> None:
        self.settings, self.queue, self.engine, self.writer, self.bus = settings, queue, engine, writer, bus
        self.readiness = readiness
        self.batch_stats = BatchStats()
        self.usage = DeviceUsage()

    def close(self) -> None:
        """Stop handing out work, and stop being ready."""
        self.readiness.set_not_ready("shutting down")
        self.queue.close()

    # --- the loader ----------------------------------------------------------------------------------

    def next_model_to_load(self) -> ModelToLoad | None:
        """Wait for the next model a queued job needs; None when stopping."""
        return self.queue.model_to_load(self.engine.needs_loading)

    def model_prepared(self, loaded: bool) -> None:
        """After a load: wake the device thread, or (no room) wait until a running or queued-ahead job ends."""
        if loaded:
            self.queue.notify()
        else:
            self.queue.wait(1.0)

    def fail_queued(self, matches: Callable[[Job], bool], error: ServiceError) -> None:
        """End the queued jobs ``matches`` picks as failed with ``error``."""
        self.writer.announce(self.queue.end_where(lambda job: job.status is JobStatus.queued and matches(job), JobStatus.failed, error))

    # --- the device threads --------------------------------------------------------------------------

    def next_batch(self, training_waiting: Callable[[], bool] = lambda: False) -> list[Job] | None:
        """The scheduler's next batch, stored and announced as running; an empty list when it is a training's turn;
        None when stopping. Jobs past their deadline fail first; while idle, what the database missed is written."""
        while not self.queue.stopping:
            self.fail_queued(self.past_deadline, self.timeout_error())
            training = training_waiting()
            share = self.queue.under_lock(lambda: self.usage.training_share)
            if self.queue.scheduler.turn(batch_ready=True, training_waiting=training, training_share=share) is Turn.training:
                return []  # the trainings are owed their share of the device, whatever is queued
            batch = self.queue.take_batch(self.engine.is_ready, wait_s=0.0 if training else 1.0)
            if batch:
                self.writer.persist(batch)
                for job in batch:
                    self.bus.emit(job, "started")
                return batch
            if self.queue.scheduler.turn(batch_ready=False, training_waiting=training, training_share=share) is Turn.training:
                return []
            self.writer.flush()
        return None

    def progress(self, batch: list[Job], step: int, total: int, previews: list[bytes] | None = None) -> None:
        """After a denoising step: end the batch's cancelled and timed-out jobs, report progress of the others (with
        a preview of each one's first image, on preview steps)."""
        firsts = itertools.accumulate((job.images_requested for job in batch), initial=0)
        preview_of = {job.id: (previews[first], data_url(previews[first])) for job, first in zip(batch, firsts)} if previews else {}

        def advance() -> list[Job]:
            ended = []
            running = running_in(batch)
            finishing_alone = all(job.finish_requested for job in running)  # else the others' steps go on
            for job in running:
                if job.cancel_requested or (job.finish_requested and not finishing_alone):
                    self.queue.end(job, JobStatus.cancelled)
                    ended.append(job)
                elif self.past_deadline(job):
                    self.queue.end(job, JobStatus.failed, self.timeout_error())
                    ended.append(job)
                else:
                    job.step, job.total_steps = step, total
                    data: dict[str, Any] = {"job_id": job.id, "step": step, "total": total}
                    if job.id in preview_of:
                        job.preview, data["preview"] = preview_of[job.id]
                    self.bus.emit(job, "progress", data)
            return ended

        self.writer.announce(self.queue.under_lock(advance))

    def should_stop(self, batch: list[Job]) -> Stop:
        """After a step: discard when no job of the batch is running any more, finish when each one running asks to
        keep what was made (A1111's interrupt), else go on."""

        def signal() -> Stop:
            running = running_in(batch)
            if not running:
                return Stop.discard
            return Stop.finish if all(job.finish_requested for job in running) else Stop.go

        return self.queue.under_lock(signal)

    def end_unfinished(self, batch: list[Job]) -> None:
        """The engine stopped the batch without images: its jobs still running (asked to finish early, on an engine
        that cannot) end as cancelled."""
        self.writer.announce(self.queue.end_where(lambda job: job in batch and job.status is JobStatus.running, JobStatus.cancelled))

    def record_batch(self, batch: list[Job], seconds: float) -> None:
        """Count the batch and publish it (the metrics)."""
        def count() -> None:
            self.batch_stats.count(batch, seconds)
            self.usage.record(False, seconds)

        self.queue.under_lock(count)
        self.bus.publish(BatchRan(images_in(batch), seconds, batch[0].total_steps))

    def record_training(self, seconds: float) -> None:
        """Count a training slice's device time (for the trainings' share)."""
        self.queue.under_lock(lambda: self.usage.record(True, seconds))

    def fail(self, batch: Iterable[Job], error: ServiceError) -> None:
        """End every still-running job of ``batch`` as failed with ``error``."""
        jobs = list(batch)
        self.writer.announce(self.queue.end_where(lambda job: job in jobs and job.status is JobStatus.running, JobStatus.failed, error))

    def give_back(self, batch: list[Job], error: ServiceUnavailableError) -> None:
        """The device is gone with ``batch`` on it: its asynchronous jobs go back to the queue (stored as queued, they
        run after the restart, one attempt used), and every synchronous job, whose client waits, fails with ``error``."""
        self.readiness.set_not_ready(error.message)
        requeued = self.queue.put_back(batch, front=True)
        ended = self.queue.end_where(lambda job: job.synchronous and job.status is JobStatus.queued, JobStatus.failed, error)
        self.writer.persist([job for job in requeued if not job.synchronous])
        self.writer.announce(ended)

    # --- the encoder ---------------------------------------------------------------------------------

    def succeed(self, job: Job, images: list[StoredImage], seconds: float) -> bool:
        """Give a job its stored images and mark it succeeded. False when it was cancelled, deleted or timed out
        meanwhile (the caller deletes the images it stored); a cancel that came too late for a step ends it now."""

        def finish() -> bool:
            if job.status is not JobStatus.running or job.deleted:
                return False
            if job.cancel_requested:
                self.queue.end(job, JobStatus.cancelled)
            else:
                job.images, job.generation_seconds = images, seconds
                job.step = job.step if job.finish_requested else job.total_steps
                self.queue.end(job, JobStatus.succeeded)
            return True

        if self.queue.under_lock(finish):
            self.writer.announce([job])
        return job.status is JobStatus.succeeded

    # --- shared --------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Queue depth and batching figures for /health and the metrics."""
        queued, running = self.queue.counts()
        stats = self.batch_stats
        return {
            "queued": queued,
            "running": running,
            "max_queue": self.settings.max_queue,
            "max_batch_size": self.queue.max_batch_images,
            "batches_run": stats.batches,
            "mixed_batches_run": stats.mixed_batches,
            "mean_batch_size": round(stats.images / stats.batches, 3) if stats.batches else 0.0,
            "scheduling": self.settings.scheduling,
            "queued_by_user": self.queue.depths(),
            "tenant_shares": {tenant: round(share, 4) for tenant, share in self.queue.shares().items()},
        }

    def retry_after_s(self, backlog: Backlog) -> int:
        """Seconds until a user's queued pixel-steps have likely run at their share of the device (one share in
        ``backlog.active_users``); without a backlog of their own, until the queue has drained by one batch's worth."""
        stats = self.batch_stats
        if backlog.user_cost and stats.seconds_per_cost is not None:
            return max(1, math.ceil(backlog.user_cost * backlog.active_users * stats.seconds_per_cost))
        return max(1, math.ceil(backlog.queued / self.queue.max_batch_images * stats.seconds_per_batch))

    def past_deadline(self, job: Job) -> bool:
        """True once SD_JOB_TIMEOUT_S has passed since the job was submitted."""
        return time.time() > job.created_at.timestamp() + self.settings.job_timeout_s

    def timeout_error(self) -> JobTimeoutError:
        """What a job past SD_JOB_TIMEOUT_S fails with."""
        return JobTimeoutError(f"the job did not finish within {self.settings.job_timeout_s:g} s (SD_JOB_TIMEOUT_S)")
