"""The ASGI application: ``app.main:app`` (``lmforge api`` serves it).

Nothing is read or connected at import: the lifespan reads the settings, upgrades the schema,
and builds the engine, storage and enqueuer. This process never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.http_errors import install_error_handlers, install_openapi_errors
from app.metrics import MetricsMiddleware
from app.metrics import router as metrics_router
from app.middleware import RequestIdMiddleware, SettingsCORSMiddleware, install_log_request_ids
from app.quotas import enforce_rate_limit, install_limits
from app.routes import api_router, health_router
from app.routes.dashboard import install_dashboard
from app.webhooks import WebhookDispatcher, job_payload
from core.spec import JobSpec
from store.db import make_engine, make_session_factory, upgrade_database
from store.queue import CeleryEnqueuer, Enqueuer, make_celery
from store.settings import Settings, get_settings
from store.storage import Storage, make_storage

log = logging.getLogger(__name__)


def start_webhooks(factory: sessionmaker[Session], s: Settings) -> WebhookDispatcher | None:
    """This process's webhook delivery thread (app.webhooks), when webhooks are on."""
    if not s.webhook_secret:
        return None
    dispatcher = WebhookDispatcher(factory, s, job_payload)
    dispatcher.start()
    return dispatcher


def create_app(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    enqueuer: Enqueuer | None = None,
) -> FastAPI:
    """Build the API. ``settings`` defaults to :func:`get_settings` at startup; ``storage``
    to ``make_storage(settings)`` (local files or S3); ``enqueuer`` to Celery on ``REDIS_URL``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or get_settings()
        await run_in_threadpool(upgrade_database, s.sqlalchemy_url)
        engine = make_engine(s.sqlalchemy_url)
        app.state.settings = s
        app.state.session_factory = make_session_factory(engine)
        app.state.storage = storage or make_storage(s)
        app.state.enqueuer = enqueuer or CeleryEnqueuer(make_celery(s))
        log.info("LMForge API ready (database %s)", engine.url.render_as_string())
        dispatcher = start_webhooks(app.state.session_factory, s)  # None: no webhook secret
        try:
            yield
        finally:
            if dispatcher is not None:
                await run_in_threadpool(dispatcher.stop)
            engine.dispose()

    app = FastAPI(
        title="LMForge",
        summary="Train LSTM language models over HTTP.",
        version="0.1.0",
        lifespan=lifespan,
        # The docs pages are served from vendored files by install_dashboard (no CDN).
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app, body_model=JobSpec)
    install_limits(app)  # body size limit (413), rate limit's 429 handler: app.quotas
    install_openapi_errors(app)
    # Outermost last: the request id is set before CORS answers a preflight.
    app.add_middleware(MetricsMiddleware)  # request latency histograms (app.metrics)
    app.add_middleware(SettingsCORSMiddleware)
    app.add_middleware(RequestIdMiddleware)
    install_log_request_ids()
    app.include_router(api_router, prefix="/v1", dependencies=[Depends(enforce_rate_limit)])
    app.include_router(health_router)
    app.include_router(metrics_router)  # GET /metrics (Prometheus; docs/operations.md)
    install_dashboard(app)  # the web dashboard at /, /static, offline /docs and /redoc
    return app


app = create_app()
