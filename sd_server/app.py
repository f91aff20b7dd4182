"""The composition root: builds the application, and in its lifespan the engine, the database, the registry, the
job queue with its workers, webhooks and metrics."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from config import Settings
from sd_server import VERSION
from sd_server.api.errors import (
    UnexpectedErrorMiddleware,
    error_responses,
    handle_service_error,
)
from sd_server.api.presenters import job_response
from sd_server.api.routes import ROUTERS
from sd_server.api.routes.users import UPLOAD_PATHS
from sd_server.domain.jobs import Job
from sd_server.engine.interface import Engine
from sd_server.errors import (
    PayloadTooLargeError,
    ServiceError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthorizedError,
)
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.retention import Retention
from sd_server.jobs.webhooks import WebhookSender
from sd_server.jobs.workers import Workers
from sd_server.observability.logging import configure_logging
from sd_server.observability.metrics import Metrics
from sd_server.observability.middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
)
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.persistence.job_store import SqlJobStore
from sd_server.registry import ModelRegistry
from sd_server.security.keys import Authenticator, KeyStore
from sd_server.security.limits import RateLimiter
from sd_server.storage.images import create_storage

logger = logging.getLogger(__name__)
EngineFactory = Callable[[Settings], Engine]


def diffusers_engine(settings: Settings) -> Engine:
    """The in-process diffusers engine (imported here, so that building an app with another engine needs no torch)."""
    from sd_server.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(settings)


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = diffusers_engine) -> FastAPI:
    """The application; its lifespan creates the engine with ``engine_factory`` from ``settings``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format)
        engine = engine_factory(settings)
        await asyncio.to_thread(migrate, settings.effective_database_url)
        database = create_database_engine(settings.effective_database_url)
        registry = await asyncio.to_thread(ModelRegistry, settings, database)
        queue = JobQueue(settings, engine, registry, SqlJobStore(database), create_storage(settings))
        workers, retention = Workers(queue, engine), Retention(queue)
        webhooks = WebhookSender(
            settings.webhook_retries, settings.webhook_backoff_s, settings.webhook_timeout_s, settings.webhook_allow_private
        )

        def send_webhook(job: Job) -> None:
            if job.webhook_url:
                webhooks.send(job.webhook_url, job_response(job, queue).model_dump(mode="json"))

        app.state.metrics = queue.observer = Metrics()
        app.state.metrics.watch(queue.stats, engine.report)
        app.state.authenticator = await asyncio.to_thread(Authenticator, settings, KeyStore(database))
        app.state.rate_limiter = RateLimiter(settings.rate_limit)
        app.state.settings, app.state.shutting_down = settings, False
        app.state.engine, app.state.job_queue, app.state.registry, app.state.retention = engine, queue, registry, retention
        queue.events.bind(asyncio.get_running_loop())
        queue.events.on_terminal(send_webhook)
        await asyncio.to_thread(queue.recover)
        workers.start()
        retention.start()
        logger.info("serving on %s (%s); default model %s", engine.device, engine.report()["dtype"], settings.default_model)
        if not app.state.authenticator.required:
            logger.warning("no API key is required (SD_AUTH=%s, no keys): anyone who reaches this port can use it", settings.auth)
        yield
        app.state.shutting_down = True
        queue.close()
        retention.stop()
        await workers.stop(settings.shutdown_timeout_s)
        await webhooks.close()
        await asyncio.to_thread(engine.unload)
        database.dispose()

    app = FastAPI(
        title="Personalized Stable Diffusion API",
        version=VERSION,
        responses=error_responses(UnauthorizedError, PayloadTooLargeError, TooManyRequestsError, ServiceError, ServiceUnavailableError),
        description="Per-user Stable Diffusion 1.5 (DreamBooth) image generation.",
        lifespan=lifespan,
    )
    add_middleware(app, settings)
    app.add_exception_handler(ServiceError, handle_service_error)
    for router in ROUTERS:
        app.include_router(router)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """From the inside out: the catch-all 500, the body size cap, CORS, then request ids and metrics outermost."""
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        upload_bytes=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials="*" not in settings.cors_origins,  # never a wildcard origin with credentials
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Seed", "X-Model-Id", "X-Generation-Time", "X-Request-ID", "Retry-After"],
    )
    app.add_middleware(RequestContextMiddleware)
