"""Allowances: a grant at the start of every calendar period. No HTTP here.

Each period's grant is a credit (ledger.rules.credit) with source `allowance` that expires when the period
ends. It is granted by whoever gets there first: the POST that creates the allowance (its current period),
and `grant_due_periods`, which the leading dispatcher runs every BILLING_ALLOWANCE_GRANT_INTERVAL seconds and
`billing grant-allowances` runs once. A period is never granted twice, however many of them race: the
period's row is claimed under its primary key, with its amount fixed, and the credit carries the
Idempotency-Key `allowance:{id}:{period start}`, so every racer posts the same request under the same key and
the ledger keeps exactly one (migration 0007).

Only the current period is ever granted: a period missed while nothing ran is granted when the granter
comes back, but periods that ended in between are not (their grants would have expired already).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from billing_service.allowances import periods, sql
from billing_service.errors import BillingError, IdempotencyKeyReused, NotFound
from billing_service.idempotency import request_hash
from billing_service.ledger import rules as ledger

log = logging.getLogger("billing_service.allowances")

POSTED_BY = "system:allowance"


@dataclass(frozen=True)
class GrantedPeriod:
    period_start: datetime
    period_end: datetime
    amount: int
    rolled_over: int
    grant_id: UUID | None


@dataclass(frozen=True)
class Allowance:
    allowance_id: UUID
    user_id: UUID
    amount: int
    period: periods.Period
    timezone: str
    anchor: datetime
    rollover: bool
    rollover_cap: int
    priority: int
    category: Literal["paid", "promotional"]
    description: str
    created_at: datetime
    stopped_at: datetime | None
    next_period_at: datetime
    latest_period: GrantedPeriod | None


@dataclass(frozen=True)
class _Terms:
    """What granting a period needs of an allowance."""

    allowance_id: UUID
    user_id: UUID
    amount: int
    period: periods.Period
    timezone: str
    anchor: datetime
    rollover: bool
    priority: int
    category: str
    description: str


def _allowance(row: tuple[Any, ...]) -> Allowance:
    latest = GrantedPeriod(*row[14:19]) if row[14] is not None else None
    return Allowance(*[*row[:14], latest])


def idempotency_key(allowance_id: UUID, period_start: datetime) -> str:
    """The credit's key for one period: the same for every process that grants it."""
    return f"allowance:{allowance_id}:{period_start.astimezone(UTC).isoformat()}"


async def create_allowance(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    amount: int,
    period: periods.Period,
    timezone: str = "UTC",
    anchor: datetime | None = None,
    rollover: bool = False,
    rollover_cap: int | None = None,
    priority: int = 50,
    category: str = "promotional",
    description: str | None = None,
    idempotency_key: str | None = None,
    posted_by: str | None = None,
    grant_now: bool = True,
) -> tuple[Allowance, bool]:
    """Create an allowance and grant its current period at once. Returns (allowance, replayed).

    Without an anchor, periods follow the calendar of `timezone` (midnight; Monday; the 1st). With rollover
    and no cap, the cap is one period's amount. `grant_now=False` leaves the current period to the granter
    (the tests use it to stand for a service that was down)."""
    digest = request_hash(
        "allowance",
        user_id=str(user_id),
        amount=amount,
        period=period,
        timezone=timezone,
        anchor=anchor.astimezone(UTC).isoformat() if anchor is not None else None,
        rollover=rollover,
        rollover_cap=rollover_cap,
        priority=priority,
        category=category,
        description=description,
    )
    now = datetime.now(UTC)
    anchor = anchor if anchor is not None else periods.calendar_anchor(period, timezone, now)
    start, _ = periods.current_period(anchor, period, timezone, now)
    params = {
        "user_id": user_id,
        "amount": amount,
        "period": period,
        "timezone": timezone,
        "anchor": anchor,
        "rollover": rollover,
        "rollover_cap": (rollover_cap if rollover_cap is not None else amount) if rollover else 0,
        "priority": priority,
        "category": category,
        "description": description or f"Allowance ({period})",
        "next_period_at": start,
        "posted_by": posted_by,
        "idempotency_key": idempotency_key,
        "request_hash": digest if idempotency_key is not None else None,
    }
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.CREATE_ALLOWANCE, params)
        row = await cursor.fetchone()
        replayed = row is None
        if row is None:
            cursor = await conn.execute(sql.ALLOWANCE_BY_KEY, params)
            row = await cursor.fetchone()
            if row is None or bytes(row[-1]) != digest:
                raise IdempotencyKeyReused()
    allowance = _allowance(row[:-1])
    if grant_now:
        # Also on a replay: a first attempt that died after its insert still grants its period here.
        await _grant_current(pool, _terms(allowance))
        allowance = await get_allowance(pool, allowance_id=allowance.allowance_id)
    return allowance, replayed


def _terms(allowance: Allowance) -> _Terms:
    return _Terms(
        allowance.allowance_id,
        allowance.user_id,
        allowance.amount,
        allowance.period,
        allowance.timezone,
        allowance.anchor,
        allowance.rollover,
        allowance.priority,
        allowance.category,
        allowance.description,
    )


async def get_allowance(pool: AsyncConnectionPool, *, allowance_id: UUID) -> Allowance:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.ALLOWANCE, {"allowance_id": allowance_id})
        row = await cursor.fetchone()
    if row is None:
        raise NotFound("No such allowance.", code="allowance_not_found")
    return _allowance(row)


async def user_allowances(pool: AsyncConnectionPool, *, user_id: UUID) -> list[Allowance]:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.USER_ALLOWANCES, {"user_id": user_id})
        return [_allowance(row) for row in await cursor.fetchall()]


async def stop_allowance(pool: AsyncConnectionPool, *, allowance_id: UUID) -> Allowance:
    """No period after this one is granted; the current period's grant stays. Stopping again changes nothing."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.STOP_ALLOWANCE, {"allowance_id": allowance_id})
        if await cursor.fetchone() is None:
            raise NotFound("No such allowance.", code="allowance_not_found")
    return await get_allowance(pool, allowance_id=allowance_id)


async def grant_due_periods(pool: AsyncConnectionPool, *, limit: int = 500) -> int:
    """Grant every active allowance's current period that is not granted yet, and finish any claim a granter
    died in the middle of. Safe to run anywhere, any number of times at once. Returns the periods credited
    by this call (replays of a twin's credit not counted)."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.PENDING_CLAIMS, {"limit": limit})
        pending = [(_Terms(*row[:10]), row[10]) for row in await cursor.fetchall()]
        cursor = await conn.execute(sql.DUE_ALLOWANCES, {"limit": limit})
        due = [(_Terms(*row[:10]), row[10]) for row in await cursor.fetchall()]
    granted = 0
    for terms, period_start in pending:
        granted += await _refusal_logged(_finish(pool, terms, period_start), terms)
    for terms, now in due:
        granted += await _refusal_logged(_grant_current(pool, terms, now), terms)
    return granted


async def _refusal_logged(granting: Awaitable[int], terms: _Terms) -> int:
    # One allowance the ledger refuses (a balance at the ledger's limit) must not hold up all the others; it
    # stays due and is tried again next time. A lost database still stops the whole pass.
    try:
        return await granting
    except BillingError as exc:
        log.error("allowance %s: the ledger refused its period: %s (%s)", terms.allowance_id, exc.detail, exc.code)
        return 0


async def _grant_current(pool: AsyncConnectionPool, terms: _Terms, now: datetime | None = None) -> int:
    """Claim and credit the allowance's current period at `now` (if not claimed yet and not stopped)."""
    now = now or datetime.now(UTC)
    k = periods.period_index(terms.anchor, terms.period, terms.timezone, now)
    start = periods.period_start(terms.anchor, terms.period, terms.timezone, k)
    async with pool.connection() as conn:
        await conn.execute(
            sql.CLAIM_PERIOD,
            {
                "user_id": terms.user_id,
                "allowance_id": terms.allowance_id,
                "period_start": start,
                "period_end": periods.period_start(terms.anchor, terms.period, terms.timezone, k + 1),
                "previous_start": periods.period_start(terms.anchor, terms.period, terms.timezone, k - 1),
            },
        )
    return await _finish(pool, terms, start)


async def _finish(pool: AsyncConnectionPool, terms: _Terms, period_start: datetime) -> int:
    """Credit the period as claimed (or replay the credit a twin made) and record its grant."""
    key = {"user_id": terms.user_id, "allowance_id": terms.allowance_id, "period_start": period_start}
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.PERIOD_CLAIM, key)
        claim = await cursor.fetchone()
    if claim is None:
        return 0  # stopped before the claim, or not started yet by the database's clock
    period_end, amount, rolled_over, grant_id = claim
    if grant_id is not None:
        return 0
    try:
        posted = await ledger.credit(
            pool,
            user_id=terms.user_id,
            amount=amount,
            description=terms.description,
            metadata={
                "allowance_id": str(terms.allowance_id),
                "period_start": period_start.astimezone(UTC).isoformat(),
                "rolled_over": rolled_over,
            },
            idempotency_key=idempotency_key(terms.allowance_id, period_start),
            posted_by=POSTED_BY,
            terms=ledger.GrantTerms(
                priority=terms.priority, category=terms.category, expires_at=period_end, source="allowance"
            ),
        )
    except IdempotencyKeyReused:
        # Someone else posted a different request under this period's key: a bug or abuse, never a second grant.
        log.error("allowance %s: the key of period %s is taken by another request", terms.allowance_id, period_start)
        return 0
    async with pool.connection() as conn:
        await conn.execute(
            sql.RECORD_GRANT,
            {**key, "period_end": period_end, "grant_id": posted.grant_id, "transaction_id": posted.transaction_id},
        )
    return 0 if posted.replayed else 1


def audit(conn: psycopg.Connection[Any]) -> list[tuple[UUID, UUID, str]]:
    """Every allowance period credited more than once, and every period whose recorded grant does not match."""
    return [(user_id, allowance_id, problem) for user_id, allowance_id, problem in conn.execute(sql.ALLOWANCE_AUDIT)]
