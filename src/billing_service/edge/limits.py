"""Rate limits on writes: a token bucket per service token and per account, held across workers and replicas.

A database round trip per request would cost more than the charge it guards, so the request path only ever
touches this worker's memory (a dict lookup and a few float operations). Each worker runs a local bucket per
key whose rate and burst are its *share* of the global budget; every `SYNC_SECONDS` it publishes its recent
request rate per key to PostgreSQL (an UNLOGGED table, `rate_limit_demand`) and reads the other workers'.
Its share is its part of the total demand: the shares of all workers add up to 1, so together they admit the
configured rate, however unevenly the load balancer spreads one token's connections.

Accuracy, and what it costs (docs/reliability.md has measured figures):
- steady state: the global rate holds to within the demand estimate's error (an average over the last
  few sync periods);
- a key new on a worker starts at 1/(live workers) of the budget until the next sync (≤ `SYNC_SECONDS`), so
  a client whose one connection lands on one worker may see early 429s for up to one sync period; it never
  gets more than the global burst;
- a worker that dies leaves its share unused until its rows age out (`HORIZON_SECONDS`);
- if PostgreSQL cannot be reached, each worker keeps its last share: the limit still holds roughly, and
  the writes fail with 503 anyway.

What the exchange costs PostgreSQL grows with the keys a worker tracks (1,000 accounts charged at random:
~1,000 rows upserted and read per worker per sync, ~11 ms of PostgreSQL time each time), so it is kept to
what changes a share:
- a *quiet* key, one whose demand on this worker and on the others (as last read) is under `QUIET` of its
  rate, has a share that barely moves with the exact figures, so it is exchanged only every `QUIET_EVERY`
  syncs (its row stays well within `HORIZON_SECONDS`). A key that gets busy on a worker is exchanged at that
  worker's next sync, as before; a worker where it is still quiet rereads it within `QUIET_EVERY` syncs;
- an idle key is dropped once its bucket would have refilled anyway (a returning key starts like a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.callers import sql
from billing_service.errors import RateLimited
from billing_service.logs import get_logger
from billing_service.settings import Settings

SYNC_SECONDS = 0.2
HORIZON_SECONDS = 1.0  # another worker's demand counts while fresher than this
QUIET = 0.05  # a key whose demand, here and elsewhere, is under this fraction of its rate
QUIET_EVERY = 2  # is exchanged every this many syncs (0.4 s: its row stays fresher than HORIZON_SECONDS)
FORGET_SECONDS = 30.0  # rows no worker has refreshed for this long are deleted from the table
_HEARTBEAT = ""

log = get_logger("billing_service.limits")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    share: float
    arrivals: int = 0
    demand: float = 0.0
    others: float = 0.0  # the other workers' demand, as last read


class KeyedBuckets:
    """Token buckets for one kind of key (per token, or per account), at this worker's share."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now: float, initial_share: float) -> float:
        """0 if admitted, else seconds until this worker's bucket would admit one."""
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(self.burst * initial_share, now, initial_share)
        bucket.arrivals += 1
        rate = self.rate * bucket.share
        capacity = max(self.burst * bucket.share, 1.0)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate if rate > 0 else 1.0

    def settle(self, period: float, now: float) -> None:
        """Fold the arrivals of the last period into each key's demand (requests per second), and drop the keys
        gone idle: near-zero demand, and no request for as long as an empty bucket takes to refill, so the
        bucket is full and forgetting it loses nothing but its share (a returning key starts like a new one:
        1/(live workers), reshared at the next sync)."""
        refilled = self.burst / self.rate
        for key, bucket in list(self.buckets.items()):
            rate = bucket.arrivals / period if period > 0 else 0.0
            bucket.arrivals = 0
            bucket.demand = rate if bucket.demand == 0 else 0.5 * bucket.demand + 0.5 * rate
            if bucket.demand < 0.01 and now - bucket.updated > refilled:
                del self.buckets[key]

    def busy(self, bucket: _Bucket) -> bool:
        """Whether this key is exchanged at every sync: demand, here or elsewhere, of QUIET of its rate or more.
        Under that, an under-the-limit share, (d + (R - D)/N)/R = 1/N + (d - D/N)/R, moves by less than QUIET
        whatever the exact figures."""
        return max(bucket.demand, bucket.others) >= QUIET * self.rate

    def reshare(self, others: dict[str, float], live_workers: int, keys: set[str] | None = None) -> None:
        """This worker's share of each key's budget, from everyone's demand.

        Under the limit (total demand D < rate R), each worker gets its own demand plus an equal part of the
        slack, (d + (R - D) / N) / R: a worker whose demand was near zero still has a real bucket when a
        request arrives. Over the limit, the budget is split in proportion to demand, d / D. Either way the
        shares of all workers add up to 1.
        """
        for key, bucket in self.buckets.items():
            if keys is not None and key not in keys:
                continue  # not exchanged this sync: keeps its share
            theirs = bucket.others = others.get(key, 0.0)
            if theirs <= 0:
                bucket.share = 1.0
                continue
            total = bucket.demand + theirs
            if total < self.rate:
                bucket.share = (bucket.demand + (self.rate - total) / live_workers) / self.rate
            else:
                bucket.share = bucket.demand / total
            bucket.share = min(1.0, max(bucket.share, 1e-6))
            bucket.tokens = min(bucket.tokens, max(self.burst * bucket.share, 1.0))


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.tokens = (
            KeyedBuckets(settings.rate_limit_token_rate, settings.rate_limit_token_burst)
            if settings.rate_limit_token_rate > 0
            else None
        )
        self.users = (
            KeyedBuckets(settings.rate_limit_user_rate, settings.rate_limit_user_burst)
            if settings.rate_limit_user_rate > 0
            else None
        )
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.live_workers = 1
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.users is not None

    def check_token(self, name: str) -> None:
        if self.tokens is not None:
            self._take(self.tokens, "t:" + name, "token")

    def check_user(self, user_id: UUID) -> None:
        if self.users is not None:
            self._take(self.users, f"u:{user_id}", "account")

    def _take(self, buckets: KeyedBuckets, key: str, what: str) -> None:
        wait = buckets.take(key, time.monotonic(), 1.0 / self.live_workers)
        if wait > 0:
            # This worker's share may be small while others' are not: a retry may land on any of them, so
            # the hint is the global bucket's wait for one write, not this worker's.
            retry_after = min(60, max(1, math.ceil(min(wait, 1.0 / buckets.rate))))
            raise RateLimited(
                f"This {what} is over its limit of {buckets.rate:g} writes/s; retry after {retry_after} s.",
                retry_after=retry_after,
            )

    def start(self, pool: AsyncConnectionPool) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._sync_forever(pool))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sync_forever(self, pool: AsyncConnectionPool) -> None:
        last = time.monotonic()
        rounds = 0
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            now = time.monotonic()
            kinds = [kind for kind in (self.tokens, self.users) if kind is not None]
            for kind in kinds:
                kind.settle(now - last, now)
            last = now
            everything = rounds % QUIET_EVERY == 0
            demands = {
                key: bucket.demand
                for kind in kinds
                for key, bucket in kind.buckets.items()
                if everything or kind.busy(bucket)
            }
            demands[_HEARTBEAT] = 1.0
            try:
                others, live = await self._exchange(pool, demands, forget=rounds % 100 == 0)
            except Exception as exc:  # noqa: BLE001 - PostgreSQL down: keep the last shares
                log.warning("rate limit sync failed", error=type(exc).__name__)
                continue
            rounds += 1
            self.live_workers = live
            exchanged = None if everything else set(demands)
            for kind in kinds:
                kind.reshare(others, live, exchanged)

    async def _exchange(
        self, pool: AsyncConnectionPool, demands: dict[str, float], *, forget: bool
    ) -> tuple[dict[str, float], int]:
        keys = list(demands)
        async with pool.connection() as conn, conn.pipeline():
            if forget:
                await conn.execute(sql.DEMAND_FORGET, {"horizon": FORGET_SECONDS})
            await conn.execute(
                sql.DEMAND_PUBLISH, {"worker": self.worker, "keys": keys, "demands": [demands[key] for key in keys]}
            )
            cursor = await conn.execute(
                sql.DEMAND_OF_OTHERS, {"worker": self.worker, "keys": keys, "horizon": HORIZON_SECONDS}
            )
            rows = await cursor.fetchall()
        others = {key: total for key, total, _ in rows}
        live = 1 + next((count for key, _, count in rows if key == _HEARTBEAT), 0)
        return others, live
