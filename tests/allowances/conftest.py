"""Allowance tests: a quiet database (migrated, no server, so no dispatcher grants behind a test's back) for
the granter's races and comebacks, and a server whose dispatcher grants every 0.2 s for period boundaries; both
package-scoped, so their connections are gone before the rest of the suite starts its servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from psycopg_pool import AsyncConnectionPool

from billing_service import db as billing_db
from billing_service.settings import Settings
from conftest import LiveServer, Postgres, start_server, stop_server

T = TypeVar("T")

GRANTING_ENV = {
    "BILLING_ALLOWANCE_GRANT_INTERVAL": "0.2",
    "BILLING_HOLD_SWEEP_INTERVAL": "0.2",
    "BILLING_HOLD_SWEEP_DELAY": "0",
}


@pytest.fixture(scope="package")
def quiet_database(postgres: Postgres) -> Iterator[str]:
    url = postgres.create_database()
    billing_db.migrate(url)
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="package")
def granting_database(postgres: Postgres) -> Iterator[str]:
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="package")
def granting_server(granting_database: str) -> Iterator[LiveServer]:
    live = start_server(granting_database, workers=2, **GRANTING_ENV)
    yield live
    stop_server(live.process)


def with_pool(url: str, action: Callable[[AsyncConnectionPool], Awaitable[T]], *, size: int = 16) -> T:
    """Run `action(pool)` in this process, on a pool of its own, as the service's code would."""

    async def main() -> T:
        pool = billing_db.create_pool(url, Settings(pool_min_size=1, pool_max_size=size))
        await pool.open(wait=True, timeout=10)
        try:
            return await action(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def periods_of(conn: Any, allowance_id: Any) -> list[tuple[Any, ...]]:
    """(period_start, amount, rolled_over, grant_id) of every granted period, oldest first."""
    return conn.execute(
        "SELECT period_start, amount, rolled_over, grant_id FROM allowance_periods WHERE allowance_id = %s"
        " ORDER BY period_start",
        (allowance_id,),
    ).fetchall()


def credits_of(conn: Any, allowance_id: Any) -> list[tuple[Any, ...]]:
    """(period_start, number of credit rows) for every period the ledger credited for the allowance."""
    return conn.execute(
        "SELECT metadata ->> 'period_start', count(*) FROM transactions"
        " WHERE type = 'credit' AND metadata ->> 'allowance_id' = %s GROUP BY 1 ORDER BY 1",
        (str(allowance_id),),
    ).fetchall()
