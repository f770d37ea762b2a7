"""The request pool's promises: every round trip is bounded, a commit the standby did not confirm is never
acknowledged, and a block's open transaction is committed or rolled back as psycopg's own block would.

(tests/reliability/test_failover.py proves the same against a real synchronous standby; these run in a second.)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
import pytest

from billing_service import db
from billing_service.errors import CommitNotReplicated
from billing_service.settings import Settings


async def _with_pool(url: str, body: Any) -> Any:
    pool = db.create_pool(url, Settings(database_url=url, pool_min_size=1, pool_max_size=2))
    await pool.open(wait=True)
    try:
        return await body(pool)
    finally:
        await pool.close()


def test_a_round_trip_past_its_bound_is_cancelled_and_the_connection_stays_usable(database_url: str) -> None:
    async def body(pool: db.BillingPool) -> tuple[float, int]:
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="within 0.3 s"):
            async with pool.connection() as conn:
                conn.round_trip_limit = 0.3
                await conn.execute("SELECT pg_sleep(5)")
        elapsed = time.monotonic() - started
        async with pool.connection() as conn:
            cursor = await conn.execute("SELECT 1")
            row = await cursor.fetchone()
        assert row is not None
        return elapsed, row[0]

    elapsed, one = asyncio.run(_with_pool(database_url, body))
    assert 0.3 <= elapsed < 2.0
    assert one == 1


def test_a_round_trip_past_its_bound_after_an_unreplicated_commit_is_commit_not_replicated(database_url: str) -> None:
    async def body(pool: db.BillingPool) -> None:
        with pytest.raises(CommitNotReplicated):
            async with pool.connection() as conn:
                conn.round_trip_limit = 0.3
                conn.unreplicated = True  # what the notice handler sets when the standby's wait is cancelled
                await conn.execute("SELECT pg_sleep(5)")

    asyncio.run(_with_pool(database_url, body))


def test_a_block_that_saw_an_unreplicated_commit_raises_and_discards_its_connection(database_url: str) -> None:
    async def body(pool: db.BillingPool) -> bool:
        with pytest.raises(CommitNotReplicated):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                conn.unreplicated = True
        return bool(conn.closed)

    assert asyncio.run(_with_pool(database_url, body))


def test_an_error_in_a_block_that_saw_an_unreplicated_commit_becomes_commit_not_replicated(database_url: str) -> None:
    async def body(pool: db.BillingPool) -> None:
        with pytest.raises(CommitNotReplicated) as raised:
            async with pool.connection() as conn:
                conn.unreplicated = True
                raise ValueError("the block failed after the commit")
        assert isinstance(raised.value.__cause__, ValueError)

    asyncio.run(_with_pool(database_url, body))


def test_a_transaction_left_open_is_committed_on_success_and_rolled_back_on_error(database_url: str) -> None:
    async def body(pool: db.BillingPool) -> list[Any]:
        async with pool.connection() as conn:
            # A temp table lives in one session: the pool has one connection, so every block gets this one.
            await conn.execute("CREATE TEMP TABLE pool_probe (n int)")
        async with pool.connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO pool_probe VALUES (1)")
        with pytest.raises(RuntimeError):
            async with pool.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("INSERT INTO pool_probe VALUES (2)")
                raise RuntimeError("the block failed")
        async with pool.connection() as conn:
            status = conn.pgconn.transaction_status
            cursor = await conn.execute("SELECT n FROM pool_probe ORDER BY n")
            return [status, [row[0] for row in await cursor.fetchall()]]

    status, rows = asyncio.run(_with_pool_of_one(database_url, body))
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert rows == [1]


async def _with_pool_of_one(url: str, body: Any) -> Any:
    pool = db.create_pool(url, Settings(database_url=url, pool_min_size=1, pool_max_size=1))
    await pool.open(wait=True)
    try:
        return await body(pool)
    finally:
        await pool.close()


def test_a_statement_past_psycopgs_4_kb_cache_limit_is_converted_once_not_at_every_execution(
    database_url: str, server: Any
) -> None:
    """HOLD_CAPTURE (9.7 KB) is past the length psycopg caches by default; re-converted at every capture it cost
    85 µs. db.configure_psycopg lifts the limit: the second execution must hit psycopg's cache."""
    from psycopg import _queries

    from billing_service.holds import sql as holds_sql

    assert len(holds_sql.HOLD_CAPTURE) > 4096
    params = {
        "user_id": uuid.uuid4(),
        "root_id": uuid.uuid4(),
        "hold_id": uuid.uuid4(),
        "amount": 1,
        "description": None,
        "metadata": None,
        "final": False,
        "allow_overrun": False,
        "events": True,
        "idempotency_key": None,
        "request_hash": None,
        "posted_by": "test",
        "request_id": None,
    }

    async def body(pool: db.BillingPool) -> tuple[int, str]:
        async with pool.connection() as conn:
            outcome = ""
            for _ in range(2):
                hits = _queries._query2pg.cache_info().hits
                cursor = await conn.execute(holds_sql.HOLD_CAPTURE, params)  # no such hold: it changes nothing
                outcome = (await cursor.fetchone() or ("",))[0]
            return _queries._query2pg.cache_info().hits - hits, outcome

    new_hits, outcome = asyncio.run(_with_pool_of_one(database_url, body))
    assert outcome == "hold_not_found"
    assert new_hits == 1
