"""The webhook dispatcher: outbox -> deliveries -> signed HTTP POSTs, with retries; and the hold sweeper.

One dispatcher leads at a time, cluster-wide: it holds a session-level advisory lock on a dedicated
connection (every `billing serve` worker and every `billing dispatch` process tries; the others keep their
connection and try again every LOCK_RETRY seconds: one trivial statement, not a new backend each time).
Losing that connection loses the lock, and the loop starts over.

Each turn of the loop:
1. FANOUT: move along the commit-safe feed (events/sql.py) and create a delivery per (event, subscribed
   webhook), in one statement with the position, so a crash repeats nothing and skips nothing;
2. send the due deliveries that head their (account, webhook) queue and are not in flight, concurrently;
   each result is recorded (delivered, or pending with the next attempt's time, or failed) with its attempt;
3. now and then: expire holds whose lease ran out and grants past their expiry (holds/rules.py
   `sweep_due_trees`, grants/rules.py `sweep_due_accounts`), so hold.expired and grant.expired appear
   in bounded time even if no request touches them; grant the allowances' periods that have started
   (allowances/rules.py `grant_due_periods`: never twice, however many run); and prune what retention allows.

It polls the outbox (every 100 ms while busy, backing off to 1 s when idle) and also wakes on
`NOTIFY billing_dispatcher` (sent by webhook creation and replays), never on the charge path: a NOTIFY in
the charge statement would serialise every commit on PostgreSQL's notification queue lock.

Delivery is at least once: a delivery is marked delivered only after the receiver's 2xx, so a crash between
the two sends it again, with the same webhook-id and the same body (both come from the stored event).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
import psycopg
from psycopg_pool import AsyncConnectionPool
from standardwebhooks.webhooks import Webhook

from billing_service.allowances import rules as allowances
from billing_service.errors import DATABASE_DOWN, InvalidRequest
from billing_service.events import rules, sql
from billing_service.grants import rules as grants
from billing_service.holds import rules as holds
from billing_service.settings import Settings

log = logging.getLogger("billing_service.dispatcher")

BUSY_POLL = 0.1
IDLE_POLL_MAX = 1.0
LOCK_RETRY = 2.0
CONCURRENCY = 32
FANOUT_BATCH = 1000
PRUNE_EVERY = 3600.0
_ERROR_LIMIT = 500


@dataclass(frozen=True)
class _Due:
    user_id: UUID
    webhook_id: UUID
    event_seq: int
    retry: int  # attempts since the delivery (re)started its schedule
    url: str
    secret: str
    previous_secret: str | None
    event_id: str
    body: str


@dataclass(frozen=True)
class _Result:
    due: _Due
    status_code: int | None
    error: str | None
    latency_ms: float
    retry_after: float | None


def sign(event_id: str, body: str, secrets: list[str], at: datetime) -> str:
    """The webhook-signature header: one `v1,<base64>` per secret, space-separated (Standard Webhooks)."""
    return " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        moment = email.utils.parsedate_to_datetime(value)
        return max((moment - datetime.now(UTC)).total_seconds(), 0.0)
    return None


async def run(url: str, pool: AsyncConnectionPool, settings: Settings) -> None:
    """Run a dispatcher until cancelled."""
    await Dispatcher(url, pool, settings).run_forever()


class Dispatcher:
    def __init__(self, url: str, pool: AsyncConnectionPool, settings: Settings) -> None:
        self._url = url
        self._pool = pool
        self._settings = settings
        self._schedule = settings.webhook_retry_schedule
        self._in_flight: dict[tuple[UUID, UUID], asyncio.Task[None]] = {}
        self._results: asyncio.Queue[_Result] = asyncio.Queue()
        self._last_sweep = 0.0
        self._last_allowances = 0.0
        self._last_prune = 0.0
        self.leading = False

    async def run_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=3)
            except psycopg.Error as exc:
                log.warning("dispatcher cannot connect: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            try:
                async with conn:
                    await self._wait_for_lock(conn)
                    backoff = 0.5
                    await conn.execute(sql.LISTEN)
                    self.leading = True
                    log.info("dispatcher leading")
                    await self._lead(conn)
            except (psycopg.Error, OSError) as exc:
                log.warning("dispatcher lost its database connection: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self.leading = False
                await self._abandon_in_flight()

    async def _wait_for_lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Return once this connection holds the leader's lock. A follower keeps its connection between tries:
        reconnecting every time cost PostgreSQL a backend start and exit per follower every LOCK_RETRY seconds."""
        while True:
            cursor = await conn.execute(sql.DISPATCHER_LOCK)
            locked = await cursor.fetchone()
            if locked and locked[0]:
                return
            await asyncio.sleep(LOCK_RETRY)

    async def _abandon_in_flight(self) -> None:
        # Their results can no longer be recorded under our lock; they stay pending and are sent again.
        for task in self._in_flight.values():
            task.cancel()
        for task in list(self._in_flight.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._in_flight.clear()
        self._results = asyncio.Queue()

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        idle = BUSY_POLL
        timeout = httpx.Timeout(self._settings.webhook_timeout)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            while True:
                busy = await self._record_results(conn)
                cursor = await conn.execute(sql.FANOUT, {"limit": FANOUT_BATCH})
                passed, _ = await cursor.fetchone() or (0, 0)
                busy += await self._start_due(conn, client)
                await self._housekeeping()
                if passed or busy:
                    idle = BUSY_POLL
                else:
                    idle = min(idle * 2, IDLE_POLL_MAX)
                await self._wait(conn, BUSY_POLL if self._in_flight else idle)

    async def _wait(self, conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
        if self._in_flight or not self._results.empty():
            # Results wake us: a receiver's answer frees its queue's next event.
            with contextlib.suppress(TimeoutError):
                result = await asyncio.wait_for(self._results.get(), seconds)
                self._results.put_nowait(result)
            return
        # Idle: LISTEN for an admin action (webhook created, replay), with the poll as the fallback.
        async for _ in conn.notifies(timeout=seconds, stop_after=1):
            pass

    async def _record_results(self, conn: psycopg.AsyncConnection[Any]) -> int:
        recorded = 0
        while not self._results.empty():
            result = self._results.get_nowait()
            await conn.execute(sql.RECORD_ATTEMPT, self._outcome(result))
            self._in_flight.pop((result.due.user_id, result.due.webhook_id), None)
            recorded += 1
        return recorded

    def _outcome(self, result: _Result) -> dict[str, Any]:
        due = result.due
        params: dict[str, Any] = {
            "user_id": due.user_id,
            "webhook_id": due.webhook_id,
            "event_seq": due.event_seq,
            "status_code": result.status_code,
            "error": result.error[:_ERROR_LIMIT] if result.error else None,
            "latency_ms": round(result.latency_ms, 3),
            "delay": 0.0,
        }
        if result.status_code is not None and 200 <= result.status_code < 300:
            return {**params, "status": "delivered"}
        if due.retry >= len(self._schedule):
            return {**params, "status": "failed"}
        delay = self._schedule[due.retry] * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret
        if result.retry_after is not None:
            delay = max(delay, min(result.retry_after, self._settings.webhook_retry_after_max))
        return {**params, "status": "pending", "delay": delay}

    async def _start_due(self, conn: psycopg.AsyncConnection[Any], client: httpx.AsyncClient) -> int:
        free = CONCURRENCY - len(self._in_flight)
        if free <= 0:
            return 0
        busy = list(self._in_flight)
        cursor = await conn.execute(
            sql.DUE_DELIVERIES,
            {"busy_users": [key[0] for key in busy], "busy_webhooks": [key[1] for key in busy], "limit": free},
        )
        started = 0
        for row in await cursor.fetchall():
            due = _Due(*row)
            key = (due.user_id, due.webhook_id)
            if key in self._in_flight:
                continue
            self._in_flight[key] = asyncio.create_task(self._deliver(client, due))
            started += 1
        return started

    async def _deliver(self, client: httpx.AsyncClient, due: _Due) -> None:
        started = time.perf_counter()
        status_code = retry_after = error = None
        try:
            await rules.check_destination(due.url, allow_insecure=self._settings.webhooks_allow_insecure)
            now = datetime.now(UTC)
            secrets = [due.secret, *([due.previous_secret] if due.previous_secret else [])]
            headers = {
                "content-type": "application/json",
                "user-agent": "billing_service-webhooks/1",
                "webhook-id": due.event_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": sign(due.event_id, due.body, secrets, now),
            }
            response = await asyncio.wait_for(
                client.post(due.url, content=due.body.encode(), headers=headers), self._settings.webhook_timeout
            )
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
                retry_after = _retry_after(response.headers.get("retry-after"))
        except InvalidRequest as exc:
            error = f"destination refused: {exc.detail}"
        except TimeoutError:
            error = f"timed out after {self._settings.webhook_timeout} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        latency_ms = (time.perf_counter() - started) * 1000
        self._results.put_nowait(_Result(due, status_code, error, latency_ms, retry_after))

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= self._settings.hold_sweep_interval:
            self._last_sweep = now
            try:
                expired = await holds.sweep_due_trees(self._pool, delay=self._settings.hold_sweep_delay)
                if expired:
                    log.info("swept %d expired holds", expired)
                written_off = await grants.sweep_due_accounts(self._pool, delay=self._settings.hold_sweep_delay)
                if written_off:
                    log.info("wrote off %d tokens of expired grants", written_off)
            except (*DATABASE_DOWN, psycopg.Error, OSError) as exc:
                log.warning("hold sweep failed: %s", exc)
        if now - self._last_allowances >= self._settings.allowance_grant_interval:
            self._last_allowances = now
            try:
                granted = await allowances.grant_due_periods(self._pool)
                if granted:
                    log.info("granted %d allowance periods", granted)
            except (*DATABASE_DOWN, psycopg.Error, OSError) as exc:
                log.warning("allowance grants failed: %s", exc)
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            try:
                async with self._pool.connection() as conn:
                    cursor = await conn.execute(sql.PRUNE, {"days": self._settings.events_retention_days})
                    row = await cursor.fetchone()
                if row and any(row):
                    log.info("pruned %d events and %d finished deliveries", *row)
            except (*DATABASE_DOWN, psycopg.Error, OSError) as exc:
                log.warning("prune failed: %s", exc)
