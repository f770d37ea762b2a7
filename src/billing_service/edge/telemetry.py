"""HTTP metrics by route template, and the /metrics endpoint. The edge records; this module knows how."""

from __future__ import annotations

import bisect
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
    """Request count and latency by (method, route template, status), tallied in this process's memory and
    flushed into prometheus-client once a second (and before every scrape and at exit).

    In multiprocess mode each prometheus-client write takes a lock and touches a memory-mapped file: about
    5 µs per counter or histogram update, paid on every request. A tally is two additions and a bisect; the
    flush writes each series once per second. The cost: another worker's last second may be missing from a
    scrape, which Prometheus's rate() does not notice.
    """

    def __init__(self) -> None:
        # key -> [requests, seconds, requests per histogram bucket]
        self._tally: dict[tuple[str, str, int], list[Any]] = {}
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._bounds = list(metrics.HTTP_DURATION_BUCKETS) + [float("inf")]

    def record(self, method: str, route: str, status: int, elapsed: float) -> None:
        key = (method, route, status)
        tally = self._tally.get(key)
        if tally is None:
            tally = self._tally[key] = [0, 0.0, [0] * len(self._bounds)]
        tally[0] += 1
        tally[1] += elapsed
        tally[2][bisect.bisect_left(self._bounds, elapsed)] += 1

    def flush(self) -> None:
        tallies, self._tally = self._tally, {}
        for key, (requests, seconds, buckets) in tallies.items():
            series = self._series.get(key)
            if series is None:
                labels = {"method": key[0], "route": key[1], "status": str(key[2])}
                series = metrics.http_requests.labels(**labels), metrics.http_request_duration.labels(**labels)
                self._series[key] = series
            counter, histogram = series
            counter.inc(requests)
            # Histogram.observe() one value at a time is the only public way in; these are the same fields
            # it updates (prometheus-client's `_sum` and `_buckets`), updated once per flush.
            histogram._sum.inc(seconds)
            for index, count in enumerate(buckets):
                if count:
                    histogram._buckets[index].inc(count)


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
    request.app.state.http_metrics.flush()
    body, content_type = await metrics.render(request.app.state.pool)
    return Response(body, media_type=content_type)
