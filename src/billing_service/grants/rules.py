"""Grants: credits with a priority, a category and maybe an expiry, drawn down in a fixed order. No HTTP here.

A credit creates a grant (ledger.rules.credit with GrantTerms); every debit draws from the account's live
grants inside its own statement (see migration 0006). This module writes what happens to grants outside a
debit: expiry (the sweep), voids, and reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from billing_service.errors import NotFound
from billing_service.events import config as events
from billing_service.grants import sql


@dataclass(frozen=True)
class Grant:
    grant_id: UUID
    user_id: UUID
    amount: int
    remaining: int
    reserved: int
    priority: int
    category: str
    expires_at: datetime | None
    created_at: datetime
    source: str
    voided_at: datetime | None


@dataclass(frozen=True)
class Voided:
    grant: Grant
    transaction_id: UUID | None
    voided: int
    replayed: bool


async def sweep_expired_grants(pool: AsyncConnectionPool, *, user_id: UUID) -> int:
    """Write off the user's grants that have expired: an expiry row each. Returns the tokens written off."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.HAS_DUE_GRANTS, {"user_id": user_id})
        if not (await cursor.fetchone() or (False,))[0]:
            return 0
        async with conn.transaction():
            await lock_account(conn, user_id=user_id)
            return await sweep_locked(conn, user_id=user_id)


async def lock_account(conn: psycopg.AsyncConnection[Any], *, user_id: UUID) -> bool:
    """Take the account row lock in the caller's transaction (which may already hold a hold tree's root: trees
    lock before accounts), so its next statements see the account's grants as nobody else can change them.
    False if there is no such account."""
    cursor = await conn.execute(sql.LOCK_ACCOUNT, {"user_id": user_id})
    return await cursor.fetchone() is not None


async def sweep_locked(conn: psycopg.AsyncConnection[Any], *, user_id: UUID) -> int:
    """The caller's transaction holds the account row (lock_account): write off its expired grants."""
    cursor = await conn.execute(sql.SWEEP_GRANTS, {"user_id": user_id, "events": events.enabled})
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def sweep_due_accounts(pool: AsyncConnectionPool, *, delay: float, limit: int = 500) -> int:
    """The dispatcher's sweep: every account with a grant expired `delay` seconds ago or more gets its expiry
    rows. Returns the tokens written off."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.DUE_ACCOUNTS, {"delay": delay, "limit": limit})
        due = [row[0] for row in await cursor.fetchall()]
    return sum([await sweep_expired_grants(pool, user_id=user_id) for user_id in due])


def _grant(row: tuple[Any, ...]) -> Grant:
    return Grant(*row)


async def live_grants(pool: AsyncConnectionPool, *, user_id: UUID) -> list[Grant]:
    """The grants with tokens left to draw or reserved by holds, in the order debits draw them."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.LIVE_GRANTS, {"user_id": user_id})
        return [_grant(row) for row in await cursor.fetchall()]


async def void_grant(
    pool: AsyncConnectionPool,
    *,
    grant_id: UUID,
    description: str = "Grant voided",
    posted_by: str | None = None,
    request_id: str | None = None,
) -> Voided:
    """Remove a grant's unspent tokens (a void row); tokens holds reserved of it are written off when they
    come back. Voiding a voided grant changes nothing."""
    async with pool.connection() as conn:
        async with conn.transaction():
            cursor = await conn.execute(sql.LOCK_GRANT_ACCOUNT, {"grant_id": grant_id})
            if (locked := await cursor.fetchone()) is None:
                raise NotFound("No such grant.", code="grant_not_found")
            await sweep_locked(conn, user_id=locked[0])  # a due grant's expiry row goes first
            cursor = await conn.execute(
                sql.VOID_GRANT,
                {
                    "grant_id": grant_id,
                    "description": description,
                    "posted_by": posted_by,
                    "request_id": request_id,
                    "events": events.enabled,
                },
            )
            outcome, transaction_id, voided = await cursor.fetchone() or ("grant_not_found", None, 0)
        grant = await _read_grant(conn, grant_id)
    return Voided(grant, transaction_id, voided, replayed=outcome == "replayed")


async def _read_grant(conn: psycopg.AsyncConnection[Any], grant_id: UUID) -> Grant:
    cursor = await conn.execute(sql.GRANT, {"grant_id": grant_id})
    row = await cursor.fetchone()
    if row is None:
        raise NotFound("No such grant.", code="grant_not_found")
    return _grant(row)


def audit(conn: psycopg.Connection[Any]) -> list[tuple[UUID, UUID | None, str]]:
    """Every account whose grants do not add up to its balance, and every grant whose remaining differs from
    what its ledger rows moved."""
    return [(user_id, grant_id, problem) for user_id, grant_id, problem in conn.execute(sql.GRANT_AUDIT)]
