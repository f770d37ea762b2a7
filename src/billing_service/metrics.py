"""Prometheus metrics, summed across `billing serve`'s worker processes.

prometheus-client's multiprocess mode: every worker writes its samples to memory-mapped files in
PROMETHEUS_MULTIPROC_DIR, and whichever worker answers /metrics reads them all. `billing serve` points the
variable at an empty directory before the workers start (prometheus-client reads it at import), because a
counter file left by an earlier run would be added to this run's totals.

Recording never touches the database: counters and the pool gauges are process-local memory writes. Only
a scrape runs a query (the active holds), once per scrape, not per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import psycopg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from psycopg_pool import AsyncConnectionPool

from billing_service.coalescing import BatchStats
from billing_service.holds import sql

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
POOL_SAMPLE_SECONDS = 1.0

http_requests = Counter(
    "billing_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
http_request_duration = Histogram(
    "billing_http_request_duration_seconds",
    "Time from the request's arrival to its last response byte, by route template and status.",
    ["method", "route", "status"],
    buckets=HTTP_DURATION_BUCKETS,
)
tokens_debited = Counter(
    "billing_tokens_debited_total", "Tokens debited by charges and hold captures (replays not counted)."
)
tokens_credited = Counter("billing_tokens_credited_total", "Tokens credited (replays not counted).")
charges = Counter(
    "billing_charges_total",
    "Charge requests by outcome: success, insufficient_balance, account_not_found, replayed.",
    ["result"],
)

# Gauges of each worker's own pool, summed over the live workers at scrape time.
pool_size = Gauge("billing_db_pool_size", "Open database connections.", multiprocess_mode="livesum")
pool_max = Gauge("billing_db_pool_max", "Connections the pools may open.", multiprocess_mode="livesum")
pool_in_use = Gauge("billing_db_pool_in_use", "Connections lent to a request.", multiprocess_mode="livesum")
pool_waiting = Gauge("billing_db_pool_waiting", "Requests queued for a free connection.", multiprocess_mode="livesum")
pool_wait_seconds = Counter("billing_db_pool_wait_seconds_total", "Time requests spent queued for a connection.")
pool_queued = Counter("billing_db_pool_queued_requests_total", "Requests that had to queue for a connection.")

# The charge batcher (BILLING_BATCH_CHARGES), sampled from its BatchStats: no work on the charge path.
batch_size = Histogram(
    "billing_batch_size", "Charges committed together in one batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
batch_fallbacks = Counter("billing_batch_fallbacks_total", "Charges a batch sent to one statement per charge.")
# The balance-read batcher (BILLING_BATCH_READS), alike.
read_batch_size = Histogram(
    "billing_read_batch_size",
    "Balance reads answered together by one statement.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

# The capture batcher (BILLING_BATCH_CAPTURES), alike.
capture_batch_size = Histogram(
    "billing_capture_batch_size",
    "Hold captures committed together in one batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
capture_batch_fallbacks = Counter(
    "billing_capture_batch_fallbacks_total", "Captures a batch sent to the single-capture path."
)

# Computed by the scraping worker from the database: a hold lives in the database, not in any one worker.
active_holds = Gauge("billing_active_holds", "Holds currently active.", multiprocess_mode="mostrecent")
held_tokens = Gauge("billing_held_tokens", "Tokens reserved by active holds.", multiprocess_mode="mostrecent")


def worker_exiting() -> None:
    """Flush this worker's tallies, then drop its live gauges, so a stopped worker's pool no longer counts."""
    flush_ledger()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


# The ledger's counters are tallied in plain ints and flushed with the HTTP metrics (edge.telemetry.HttpMetrics
# says why: a multiprocess-mode write costs ~5 µs, paid per charge; a tally costs an addition).
_charges_by_result: dict[str, int] = {}
_debited = [0]
_credited = [0]


def record_charge(result: str, amount: int) -> None:
    _charges_by_result[result] = _charges_by_result.get(result, 0) + 1
    if result == "success":
        _debited[0] += amount


def record_capture(amount: int, *, replayed: bool) -> None:
    # A capture is a debit too: billing_tokens_debited_total is every token that left a balance.
    if not replayed:
        _debited[0] += amount


def record_credit(amount: int, *, replayed: bool) -> None:
    if not replayed:
        _credited[0] += amount


def flush_ledger() -> None:
    """Move this process's ledger tallies into prometheus-client."""
    counts = dict(_charges_by_result)
    _charges_by_result.clear()
    for result, count in counts.items():
        charges.labels(result=result).inc(count)
    debited, credited = _debited[0], _credited[0]
    _debited[0] = _credited[0] = 0
    if debited:
        tokens_debited.inc(debited)
    if credited:
        tokens_credited.inc(credited)


def sample_pool(pool: AsyncConnectionPool) -> None:
    # pop_stats resets the pool's counters, so each sample adds only what happened since the last one.
    stats = pool.pop_stats()
    size = stats.get("pool_size", 0)
    pool_size.set(size)
    pool_max.set(stats.get("pool_max", 0))
    pool_in_use.set(size - stats.get("pool_available", 0))
    pool_waiting.set(stats.get("requests_waiting", 0))
    pool_wait_seconds.inc(stats.get("requests_wait_ms", 0) / 1000)
    pool_queued.inc(stats.get("requests_queued", 0))


class BatcherSampler:
    """Turns a batcher's running totals into metric increments, remembering what it already exported."""

    def __init__(self, sizes: Histogram, fallbacks: Counter | None = None) -> None:
        self.sizes, self.fallbacks = sizes, fallbacks
        self.exported_batches = 0
        self.exported_fallbacks = 0

    def sample(self, stats: BatchStats) -> None:
        new_batches = stats.batches - self.exported_batches
        # `sizes` keeps the newest sizes only; a backlog longer than it is exported as far as it goes.
        for size in stats.sizes[-new_batches:] if new_batches > 0 else ():
            self.sizes.observe(size)
        if self.fallbacks is not None:
            self.fallbacks.inc(max(0, stats.fallbacks - self.exported_fallbacks))
        self.exported_batches, self.exported_fallbacks = stats.batches, stats.fallbacks


async def sample_forever(state: Any) -> None:
    """Every second: this worker's HTTP tallies, pool gauges, and its batchers' new batches if it batches."""
    samplers = {
        "batcher": BatcherSampler(batch_size, batch_fallbacks),
        "read_batcher": BatcherSampler(read_batch_size),
        "capture_batcher": BatcherSampler(capture_batch_size, capture_batch_fallbacks),
    }
    while True:
        state.http_metrics.flush()
        flush_ledger()
        sample_pool(state.pool)
        for name, sampler in samplers.items():
            batcher = getattr(state, name, None)
            if batcher is not None:
                sampler.sample(batcher.stats)
        await asyncio.sleep(POOL_SAMPLE_SECONDS)


async def _sample_holds(pool: AsyncConnectionPool) -> None:
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(sql.ACTIVE_HOLDS)
            row = await cursor.fetchone()
    except psycopg.errors.UndefinedTable:
        return  # a schema without holds
    if row is not None:
        active_holds.set(row[0])
        held_tokens.set(row[1])


async def render(pool: AsyncConnectionPool) -> tuple[bytes, str]:
    """The exposition text of every worker's metrics, and its content type."""
    flush_ledger()
    sample_pool(pool)
    with contextlib.suppress(psycopg.Error):
        # A scrape while the database is down still reports everything else.
        await _sample_holds(pool)
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
