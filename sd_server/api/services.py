"""The services the composition root (``sd_server.app``) builds once, by constructor injection, typed; the
routes depend on the one they use (``dependencies``), never on what another holds."""

from dataclasses import dataclass

from sqlalchemy import Engine as DatabaseEngine

from config import Settings
from sd_server.api.work_pools import WorkPool
from sd_server.engine.interface import Engine
from sd_server.jobs.dispatch import Dispatcher
from sd_server.jobs.events import EventBus
from sd_server.jobs.retention import Retention
from sd_server.jobs.submission import Jobs
from sd_server.jobs.trainings import Trainings
from sd_server.jobs.webhooks import WebhookSender
from sd_server.jobs.workers import Workers
from sd_server.observability.liveness import Liveness, Readiness
from sd_server.observability.metrics import Metrics
from sd_server.provenance.marks import Provenance
from sd_server.registry import ModelRegistry
from sd_server.security.keys import Authenticator
from sd_server.security.limits import RateLimiter
from sd_server.security.sessions import Sessions
from sd_server.storage.images import ImageStorage
from sd_server.styles import StyleBook


@dataclass(frozen=True)
class Services:
    """Everything the service runs on, built once in the lifespan and started and stopped there."""

    settings: Settings
    engine: Engine
    database: DatabaseEngine
    storage: ImageStorage
    registry: ModelRegistry
    bus: EventBus
    liveness: Liveness
    readiness: Readiness
    dispatcher: Dispatcher
    jobs: Jobs
    trainings: Trainings
    workers: Workers
    retention: Retention
    webhooks: WebhookSender
    styles: StyleBook
    metrics: Metrics
    authenticator: Authenticator
    sessions: Sessions
    rate_limiter: RateLimiter
    decoding: WorkPool  # decodes uploaded pictures and zips (SD_DECODE_THREADS)
    lookups: WorkPool  # resolves webhook hosts
    provenance: Provenance
