"""Per-request telemetry (request id, access log line, HTTP metrics) and the /metrics endpoint."""

from __future__ import annotations

import hmac
import re
import time
import uuid
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_service import metrics
from billing_service.errors import Unauthorized
from billing_service.logs import get_logger
from billing_service.settings import Settings

# A caller's request id is kept only if it is short and plain: it ends up in every log line and header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

log = get_logger("billing_service.access")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_template(scope: Scope) -> str:
    """`/billing/balance/{user_id}`, never the raw path: one time series per route, not per user."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    # Refused before routing (401, 413, 415): find the documented route the request was aimed at.
    app = scope.get("app")
    if app is None:
        return "unmatched"
    templates: list[tuple[re.Pattern[str], str]] | None = getattr(app.state, "route_templates", None)
    if templates is None:
        paths = sorted(app.openapi().get("paths", {}), key=lambda path: (path.count("{"), path))
        templates = [(compile_path(path)[0], path) for path in paths]
        app.state.route_templates = templates
    for pattern, path in templates:
        if pattern.match(scope["path"]):
            return path
    return "unmatched"


class RequestTelemetryMiddleware:
    """Outermost middleware: every request, including those refused before routing, gets a request id
    (the caller's X-Request-ID if sane, else a new one, echoed back), one access log line and HTTP metrics.
    No database work here: the hot path pays for a few memory writes."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log
        # Labelled children, looked up once per (method, route, status) instead of on every request.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _record(self, method: str, route: str, status: int, elapsed: float) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            labels = {"method": method, "route": route, "status": str(status)}
            series = metrics.http_requests.labels(**labels), metrics.http_request_duration.labels(**labels)
            self._series[key] = series
        series[0].inc()
        series[1].observe(elapsed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _REQUEST_ID.fullmatch(candidate) else None
                break
        request_id = request_id or uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            # Any other method string a client invents would be a new time series: fold them into one.
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self._record(method, route, status, elapsed)
            if self.access_log:
                # The path without its query string; credentials never travel in either, but be sure.
                log.info(
                    "request",
                    method=method,
                    path=scope["path"],
                    route=route,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )
            # Not cleared here: uvicorn logs an unhandled exception after this returns, and that line
            # should carry the request id too. Each request runs in its own task, so nothing leaks.


router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics of all workers. Open, unless BILLING_METRICS_TOKEN is set (then a bearer token)."""
    settings: Settings = request.app.state.settings
    required = settings.metrics_token
    if required is not None:
        presented = request.headers.get("authorization", "").partition(" ")[2].strip()
        if not hmac.compare_digest(presented.encode(), required.get_secret_value().encode()):
            raise Unauthorized("/metrics needs 'Authorization: Bearer <BILLING_METRICS_TOKEN>'.")
    body, content_type = await metrics.render(request.app.state.pool)
    return Response(body, media_type=content_type)
