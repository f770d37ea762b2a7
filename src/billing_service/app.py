"""The ASGI application: middleware, routes, error handlers, and the pool's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_service import db, metrics
from billing_service.edge.auth import AuthenticationMiddleware
from billing_service.edge.telemetry import RequestTelemetryMiddleware
from billing_service.edge.telemetry import router as metrics_router
from billing_service.errors import PayloadTooLarge, error_response, install_error_handlers
from billing_service.holds.routes import router as holds_router
from billing_service.ledger.batcher import ChargeBatcher
from billing_service.ledger.routes import health, router
from billing_service.logs import configure_logging
from billing_service.settings import Settings, get_settings


class RequestGuardMiddleware:
    """Refuses what no route should parse: bodies over the limit (413, at once from Content-Length, or as
    soon as a chunked body passes it) and writes whose declared Content-Type is not JSON (415)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                too_large = PayloadTooLarge(f"Bodies are limited to {self.max_bytes} bytes.")
                await error_response(413, too_large.detail, too_large.code)(scope, receive, send)
                return
            if name == b"content-type" and scope["method"] in ("POST", "PUT", "PATCH"):
                media_type = value.split(b";")[0].strip().lower()
                if media_type != b"application/json" and not media_type.endswith(b"+json"):
                    detail = "Send the body as JSON (Content-Type: application/json)."
                    await error_response(415, detail, "unsupported_media_type")(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI turns any other exception raised while it reads the body into a 400; an
                    # HTTPException passes through to the handler, which answers 413 payload_too_large.
                    raise StarletteHTTPException(413, f"Bodies are limited to {self.max_bytes} bytes.")
            return message

        await self.app(scope, limited_receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
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
        app.state.batcher = (
            ChargeBatcher(pool, max_size=settings.batch_max_size, max_inflight=settings.batch_max_inflight)
            if settings.batch_charges
            else None
        )
        try:
            yield
        finally:
            pool_sampler.cancel()
            metrics.worker_exiting()
            if app.state.batcher is not None:
                await app.state.batcher.close()
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
    app.include_router(health)
    app.include_router(metrics_router)
    app.state.settings = settings
    install_error_handlers(app)
    # add_middleware wraps: the last added runs first. Authenticate first (fail closed), then guard the body.
    app.add_middleware(RequestGuardMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthenticationMiddleware, settings=settings)
    # Outermost: even a request refused by authentication gets a request id, a log line and a metric.
    app.add_middleware(RequestTelemetryMiddleware, access_log=settings.access_log)
    return app
