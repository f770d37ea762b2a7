"""The ASGI application: the edge in front of FastAPI, the domains' routers, and the pool's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from billing_service import db, metrics
from billing_service.allowances.routes import router as allowances_router
from billing_service.callers.routes import router as tokens_router
from billing_service.callers.rules import DatabaseTokens
from billing_service.console.routes import router as console_router
from billing_service.edge.auth import Authenticator
from billing_service.edge.layer import Edge
from billing_service.edge.limits import RateLimiter
from billing_service.edge.telemetry import router as metrics_router
from billing_service.errors import install_error_handlers
from billing_service.events import config as events_config
from billing_service.events import dispatcher
from billing_service.events.routes import router as events_router
from billing_service.grants.routes import router as grants_router
from billing_service.holds.batcher import CaptureBatcher
from billing_service.holds.routes import fast_routes as holds_fast_routes
from billing_service.holds.routes import router as holds_router
from billing_service.ledger.batcher import ChargeBatcher
from billing_service.ledger.read_batcher import BalanceBatcher
from billing_service.ledger.routes import fast_routes as ledger_fast_routes
from billing_service.ledger.routes import health, router
from billing_service.logs import configure_logging
from billing_service.refunds.routes import router as refunds_router
from billing_service.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Edge:
    """The ASGI application a server runs: the edge, in front of FastAPI and the domains' routers."""
    settings = settings or get_settings()
    events_config.configure(settings)
    configure_logging(
        log_format=settings.log_format or ("console" if settings.embedded else "json"),
        level=settings.log_level,
        secrets=settings.secret_values(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = db.resolve_database_url(settings)
        pool = db.create_pool(url, settings)
        # wait=False: a worker that (re)starts while the database is down still serves fast 503s.
        await pool.open(wait=False)
        app.state.pool = pool
        pool_sampler = asyncio.create_task(metrics.sample_forever(app.state))
        db_tokens = app.state.authenticator.db_tokens = DatabaseTokens(pool)
        db_tokens.start()
        app.state.limiter.start(pool)
        app.state.batcher = (
            ChargeBatcher(pool, max_size=settings.batch_max_size, max_inflight=settings.batch_max_inflight)
            if settings.batch_charges
            else None
        )
        app.state.read_batcher = (
            BalanceBatcher(pool, max_size=settings.batch_max_size, max_inflight=settings.read_batch_max_inflight)
            if settings.batch_reads
            else None
        )
        app.state.capture_batcher = (
            CaptureBatcher(pool, max_size=settings.batch_max_size, max_inflight=settings.batch_max_inflight)
            if settings.batch_captures
            else None
        )
        # Every worker starts one; the advisory lock lets exactly one of them (cluster-wide) lead.
        dispatching = asyncio.create_task(dispatcher.run(url, pool, settings)) if settings.dispatcher else None
        # What the worker built to start (FastAPI, pydantic schemas, routes: ~135,000 objects) lives as long as
        # the worker: out of the collector's sight, a full collection under load no longer walks it (it took
        # ~70 ms on a quiet machine, several times that on a loaded one, stalling every request in flight).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if dispatching is not None:
                dispatching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dispatching
            pool_sampler.cancel()
            await db_tokens.close()
            await app.state.limiter.close()
            app.state.http_metrics.flush()
            if app.state.access_log is not None:
                app.state.access_log.flush()
            metrics.worker_exiting()
            if app.state.batcher is not None:
                await app.state.batcher.close()
            if app.state.read_batcher is not None:
                await app.state.read_batcher.close()
            if app.state.capture_batcher is not None:
                await app.state.capture_batcher.close()
            await pool.close()

    app = FastAPI(
        title="billing_service",
        summary="The token ledger of the agent platform.",
        version="0.1.0",
        lifespan=lifespan,
        # Metrics are prometheus-client's (/metrics). FastAPI's own OpenTelemetry hook, even idle, reads
        # os.environ on every request to see whether a provider appeared: 8% of a balance read.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.include_router(router)
    app.include_router(holds_router)
    app.include_router(grants_router)
    app.include_router(refunds_router)
    app.include_router(allowances_router)
    app.include_router(events_router)
    app.include_router(tokens_router)
    app.include_router(health)
    app.include_router(metrics_router)
    if settings.console:
        app.include_router(console_router)
    app.state.settings = settings
    app.state.authenticator = Authenticator(settings)
    app.state.limiter = RateLimiter(settings)
    install_error_handlers(app)
    return Edge(app, settings, [*ledger_fast_routes, *holds_fast_routes])
