"""The dispatcher's fan-out reads the feed from its position on, whatever the retention keeps behind it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from billing_service import db as billing_db
from billing_service.events import sql
from billing_service.events.dispatcher import FANOUT_BATCH
from conftest import Postgres

RETAINED = 20_000


@pytest.fixture
def retained_feed(postgres: Postgres) -> Iterator[psycopg.Connection[Any]]:
    """A database of its own holding 20,000 committed events, the dispatcher's position 100 from the end."""
    url = postgres.create_database()
    try:
        billing_db.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO events (user_id, seq, type, data, txid)"
                # Old transaction ids (a thousand events each), below any snapshot's xmin: committed, in the feed.
                " SELECT gen_random_uuid(), 1, 'charge.posted', '{}', (3 + n / 1000)::text::xid8"
                " FROM generate_series(0, %(count)s - 1) AS n",
                {"count": RETAINED},
            )
            conn.execute("ANALYZE events")
            conn.execute(
                "UPDATE dispatcher_state s SET txid = e.txid, user_id = e.user_id, seq = e.seq"
                " FROM (SELECT txid, user_id, seq FROM events ORDER BY txid DESC, user_id DESC, seq DESC"
                " OFFSET 100 LIMIT 1) e WHERE s.id = 1"
            )
            yield conn
    finally:
        postgres.drop_database(url)


def test_a_poll_reads_from_the_position_not_from_the_oldest_retained_event(
    retained_feed: psycopg.Connection[Any],
) -> None:
    # Joined to the position, the row comparison was a join filter: every poll walked the feed index from the
    # oldest retained event (here 18,646 buffers per poll, growing with retention). Bound by it: a handful.
    explained = retained_feed.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql.FANOUT}", {"limit": FANOUT_BATCH})
    plan = explained.fetchone()[0]  # type: ignore[index]
    plan = plan if isinstance(plan, list) else json.loads(plan)
    top = plan[0]["Plan"]
    assert top["Shared Hit Blocks"] + top.get("Shared Read Blocks", 0) < 200, json.dumps(plan, indent=1)
    # ...and it did its job: the 100 events past the position are fanned out (to no webhook) and passed.
    last = "SELECT txid, user_id, seq FROM events ORDER BY txid DESC, user_id DESC, seq DESC LIMIT 1"
    assert retained_feed.execute("SELECT txid, user_id, seq FROM dispatcher_state").fetchone() == (
        retained_feed.execute(last).fetchone()
    )
