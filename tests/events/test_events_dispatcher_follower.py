"""A dispatcher that does not lead waits on one connection, and leads as soon as the lock is free."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from billing_service import db
from billing_service.events import dispatcher, sql
from billing_service.settings import Settings
from conftest import Postgres


def _lock_waiters(url: str) -> set[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            [sql.DISPATCHER_LOCK],
        ).fetchall()
    return {row[0] for row in rows}


@pytest.fixture
def database_url(postgres: Postgres) -> Iterator[str]:
    """A database of its own: the suite's shared one has `billing serve` dispatchers of other tests trying the
    same lock, and they would lead, or be counted as this follower's tries."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


def test_a_follower_keeps_one_connection_and_leads_once_the_leader_lets_go(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.migrate(database_url)
    monkeypatch.setattr(dispatcher, "LOCK_RETRY", 0.05)
    settings = Settings(database_url=database_url)

    async def scenario() -> tuple[list[set[int]], bool]:
        leader = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        await leader.execute(sql.DISPATCHER_LOCK)
        leader_pid = leader.info.backend_pid
        pool = db.create_pool(database_url, settings)
        await pool.open(wait=True)
        follower = dispatcher.Dispatcher(database_url, pool, settings)
        task = asyncio.create_task(follower.run_forever())
        seen: list[Any] = []
        try:
            for _ in range(4):
                await asyncio.sleep(0.3)
                seen.append(await asyncio.to_thread(_lock_waiters, database_url) - {leader_pid})
            assert not follower.leading
            await leader.close()  # the leader's session ends: its lock is released
            for _ in range(50):
                if follower.leading:
                    break
                await asyncio.sleep(0.05)
            return seen, follower.leading
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pool.close()

    seen, leading = asyncio.run(scenario())
    # The same backend tried every time (the query column keeps the last statement of an idle session).
    assert len(set().union(*seen)) == 1, seen
    assert leading
