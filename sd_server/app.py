"""The composition root: builds the application, and in its lifespan the engine, the database, the registry, the
job queue with its workers, webhooks and metrics."""

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from sqlalchemy import Engine as DatabaseEngine

from config import Settings
from sd_server import VERSION
from sd_server.api.dependencies import refuse_nul_characters
from sd_server.api.errors import (
    UnexpectedErrorMiddleware,
    error_responses,
    handle_service_error,
    handle_validation_error,
)
from sd_server.api.presenters import job_response, training_response
from sd_server.api.routes import ROUTERS
from sd_server.api.routes.generation import IMAGE_INPUT_PATHS
from sd_server.api.routes.trainings import TRAINING_UPLOAD_PATHS
from sd_server.api.routes.users import UPLOAD_PATHS
from sd_server.api.services import Services
from sd_server.api.work_pools import WEBHOOK_LOOKUP_THREADS, WorkPool
from sd_server.demo.personalisation import score_samples
from sd_server.engine.interface import Engine
from sd_server.errors import (
    BadRequestError,
    PayloadTooLargeError,
    ServiceError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthorizedError,
)
from sd_server.jobs.batching import BatchRules
from sd_server.jobs.dispatch import Dispatcher
from sd_server.jobs.events import EventBus, counting
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.retention import Retention
from sd_server.jobs.scheduler import FairScheduler, FifoScheduler
from sd_server.jobs.submission import Jobs
from sd_server.jobs.trainings import Trainings
from sd_server.jobs.webhooks import WebhookSender
from sd_server.jobs.workers import Workers
from sd_server.jobs.writer import Writer
from sd_server.observability.liveness import Liveness, Readiness
from sd_server.observability.logging import configure_logging
from sd_server.observability.metrics import Metrics
from sd_server.observability.middleware import (
    BodyLimit,
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
)
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.persistence.job_store import SqlJobStore
from sd_server.persistence.outbox import WebhookOutbox
from sd_server.persistence.training_store import SqlTrainingStore
from sd_server.provenance.marks import Provenance
from sd_server.registry import ModelRegistry
from sd_server.security.keys import Authenticator, KeyStore
from sd_server.security.limits import RateLimiter
from sd_server.security.sessions import Sessions
from sd_server.storage.images import ImageStorage, create_storage
from sd_server.storage.model_files import clean_staging
from sd_server.styles import StyleBook

logger = logging.getLogger(__name__)
EngineFactory = Callable[[Settings], Engine]
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
UI_DIR = Path(__file__).resolve().parent / "web"  # the web app at /ui: static files, no build step


def diffusers_engine(settings: Settings) -> Engine:
    """The in-process diffusers engine (imported here, so that building an app with another engine needs no torch)."""
    from sd_server.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(settings)


def configured_engine(settings: Settings) -> Engine:
    """The engine SD_ENGINE names: the in-process diffusers engine, or Ray Serve replicas (the optional extra)."""
    if settings.engine == "local":
        return diffusers_engine(settings)
    try:
        from sd_server.engine.ray_engine import RayEngine
    except ImportError as error:
        raise ServiceUnavailableError(
            "SD_ENGINE=ray needs Ray Serve: pip install -r requirements-ray.txt (./start.sh --ray installs it)"
        ) from error
    return RayEngine(settings)


def stop_this_process() -> None:
    """Ask this process to shut down gracefully (SIGTERM), for its supervisor to start a fresh one."""
    logger.critical("the device is lost; stopping the process so that its supervisor restarts it")
    os.kill(os.getpid(), signal.SIGTERM)


async def start_services(
    settings: Settings, engine_factory: EngineFactory, on_device_lost: Callable[[], None], metrics: Metrics
) -> Services:
    """Build every service, clean up what a crash left behind, recover the last run's work, start the workers."""
    engine = engine_factory(settings)  # on the main thread: Ray's start-up sets signal handlers (see ray_engine)
    await asyncio.to_thread(migrate, settings.effective_database_url)
    database = create_database_engine(settings.effective_database_url, settings.database_lock_timeout_s)
    storage = create_storage(settings)
    await asyncio.to_thread(clean_up_leftovers, settings, storage)
    services = await asyncio.to_thread(build_services, settings, engine, database, storage, on_device_lost, metrics)
    services.bus.bind(asyncio.get_running_loop())
    await asyncio.to_thread(services.jobs.recover)
    await asyncio.to_thread(services.trainings.recover)
    services.workers.start()
    services.retention.start()
    services.webhooks.start()
    return services


def build_services(
    settings: Settings,
    engine: Engine,
    database: DatabaseEngine,
    storage: ImageStorage,
    on_device_lost: Callable[[], None],
    metrics: Metrics,
) -> Services:
    """Every service, each given what it uses when it is made (blocking: the registry, styles and keys read the
    database)."""
    retry_s = settings.database_retry_s
    registry = ModelRegistry(settings, database)
    liveness, readiness = Liveness(), Readiness()
    job_store, training_store = SqlJobStore(database, retry_s), SqlTrainingStore(database, retry_s)
    keys = KeyStore(database, retry_s)
    webhooks = WebhookSender(
        settings,
        WebhookOutbox(database, retry_s),
        lambda job: job_response(job, None, storage).model_dump(mode="json"),  # an ended job has no position
        lambda training: training_response(training).model_dump(mode="json"),
        liveness,
        secret_of=keys.webhook_secret,
    )
    bus = EventBus([counting(metrics), webhooks.on_event])
    writer = Writer(job_store, training_store, bus, liveness)
    max_batch_images = settings.max_batch_size or engine.default_max_batch_size
    rules = BatchRules(max_batch_images, settings.max_adapters, settings.batch_across_adapters)
    scheduler = (FairScheduler if settings.scheduling == "fair" else FifoScheduler)(rules, settings.training_share)
    queue = JobQueue(scheduler, max_batch_images, settings.batch_wait_ms / 1000, settings.batch_fill_wait_ms / 1000)
    dispatcher = Dispatcher(settings, queue, engine, writer, bus, readiness)
    jobs = Jobs(settings, queue, dispatcher, job_store, writer, bus, engine, registry, storage)
    evaluators = {"demo-world": score_samples}
    trainings = Trainings(settings, engine, registry, training_store, storage, writer, bus, liveness, queue.notify, evaluators)
    metrics.watch(dispatcher.stats, engine.report)
    provenance = Provenance(settings)
    return Services(
        settings=settings,
        engine=engine,
        database=database,
        storage=storage,
        registry=registry,
        bus=bus,
        liveness=liveness,
        readiness=readiness,
        dispatcher=dispatcher,
        jobs=jobs,
        trainings=trainings,
        workers=Workers(settings, dispatcher, engine, registry, storage, trainings, liveness, on_device_lost, provenance),
        provenance=provenance,
        retention=Retention(settings, jobs, job_store, liveness),
        webhooks=webhooks,
        styles=StyleBook(settings, database),
        metrics=metrics,
        authenticator=Authenticator(settings, keys),
        sessions=Sessions(settings.session_secret, settings.session_ttl_s, database, retry_s),
        rate_limiter=RateLimiter(settings.rate_limit, settings.read_rate_limit, settings.rate_limit_storage),
        decoding=WorkPool("sd-decode", settings.decode_threads),
        lookups=WorkPool("sd-lookup", WEBHOOK_LOOKUP_THREADS),
    )


async def stop_services(services: Services) -> None:
    """Let the running batch finish and its images be stored, then close everything."""
    services.decoding.shutdown()
    services.lookups.shutdown()
    services.dispatcher.close()
    services.retention.stop()
    if await services.workers.stop(services.settings.shutdown_timeout_s):
        await asyncio.to_thread(services.trainings.suspend)
    await services.webhooks.close()
    await asyncio.to_thread(services.engine.close)
    services.database.dispose()


def clean_up_leftovers(settings: Settings, storage: ImageStorage) -> None:
    """Remove the half-written files a crash can leave: images being written, uploads being checked."""
    removed = storage.clean_up() + clean_staging(settings.models_dir)
    if removed:
        logger.info("removed %d half-written files left by the last run", removed)


def warn_if_open(settings: Settings, authenticator: Authenticator) -> None:
    """Say loudly that no key is required, the louder when the port is reachable from other machines."""
    if authenticator.required:
        return
    message = f"no API key is required (SD_AUTH={settings.auth}, no keys): anyone who reaches this port can use it"
    if settings.host in LOOPBACK_HOSTS:
        logger.warning(message)
    else:
        logger.critical(
            "%s, and it listens on %s, not only on this machine. Create an admin key (POST /keys with "
            '{"role": "admin"}) or set SD_ADMIN_KEY, or bind to 127.0.0.1 with SD_HOST.', message, settings.host
        )


def create_app(
    settings: Settings | None = None,
    engine_factory: EngineFactory = configured_engine,
    on_device_lost: Callable[[], None] = stop_this_process,
) -> FastAPI:
    """The application; its lifespan creates the engine with ``engine_factory`` from ``settings``, and calls
    ``on_device_lost`` when the device fails for good (the default stops the process for its supervisor)."""
    settings = settings or Settings()
    metrics = Metrics()  # the HTTP middleware counts into it from the first request; the services add their series

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_probes)
        services = await start_services(settings, engine_factory, on_device_lost, metrics)
        app.state.settings, app.state.services, app.state.shutting_down = settings, services, False
        logger.info("serving on %s (%s); default model %s", services.engine.device, services.engine.report()["dtype"], settings.default_model)
        warn_if_open(settings, services.authenticator)
        yield
        app.state.shutting_down = True
        await stop_services(services)

    app = FastAPIOffline(  # /docs (and /redoc: offline_docs_router) from packaged assets: they work without network
        static_url="/docs-assets",
        redoc_url=None,
        title="Personalized Stable Diffusion API",
        version=VERSION,
        responses=error_responses(
            BadRequestError, UnauthorizedError, PayloadTooLargeError, TooManyRequestsError, ServiceError, ServiceUnavailableError
        ),
        description="Per-user Stable Diffusion 1.5 (DreamBooth) image generation.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_nul_characters)],
    )
    add_middleware(app, settings, metrics)
    app.add_exception_handler(ServiceError, handle_service_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    return app


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """From the inside out: the catch-all 500, the body size cap, CORS, then request ids and metrics outermost."""
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        limits=[
            BodyLimit(UPLOAD_PATHS, settings.max_upload_bytes, "SD_MAX_UPLOAD_BYTES"),
            BodyLimit(TRAINING_UPLOAD_PATHS, settings.max_training_upload_bytes, "SD_MAX_TRAINING_UPLOAD_BYTES"),
            BodyLimit(IMAGE_INPUT_PATHS, settings.max_image_body_bytes, "SD_MAX_IMAGE_BODY_BYTES"),
        ],
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials="*" not in settings.cors_origins,  # never a wildcard origin with credentials
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["Location", "X-Seed", "X-Model-Id", "X-Generation-Time", "X-Request-ID", "Retry-After"],
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
