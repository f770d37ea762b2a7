"""HTTP metrics by route template, and the /metrics endpoint. The edge records; this module knows how."""

from __future__ import annotations

import hmac
import re
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from starlette.routing import compile_path
from starlette.types import Scope

from billing_service import metrics
from billing_service.errors import Unauthorized
from billing_service.settings import Settings

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope, app: FastAPI) -> str:
    """`/billing/balance/{user_id}`, never the raw path: one time series per route, not per user."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    # Refused before routing (401, 413, 415): find the documented route the request was aimed at.
    templates: list[tuple[re.Pattern[str], str]] | None = getattr(app.state, "route_templates", None)
    if templates is None:
        paths = sorted(app.openapi().get("paths", {}), key=lambda path: (path.count("{"), path))
        templates = [(compile_path(path)[0], path) for path in paths]
        app.state.route_templates = templates
    for pattern, path in templates:
        if pattern.match(scope["path"]):
            return path
    return "unmatched"


class HttpMetrics:
    """Request count and latency by (method, route template, status), with each labelled child looked up
    once and then cached: recording a request is two memory writes, not a label resolution."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, method: str, route: str, status: int, elapsed: float) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            labels = {"method": method, "route": route, "status": str(status)}
            series = metrics.http_requests.labels(**labels), metrics.http_request_duration.labels(**labels)
            self._series[key] = series
        series[0].inc()
        series[1].observe(elapsed)


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
