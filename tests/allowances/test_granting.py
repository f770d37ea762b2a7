"""The granter: a period is granted exactly once however many processes race for it, a period missed while
nothing ran is granted when the granter comes back, and a granter that died half-way is finished by the next.

These run on a quiet database (no server, no dispatcher): allowances are created with `grant_now=False`, as
if the service had been down since, and the test alone decides who grants.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from allowances.conftest import credits_of, periods_of, with_pool
from billing_service.allowances import rules as allowances
from billing_service.allowances import sql as allowance_sql
from billing_service.allowances.periods import current_period
from billing_service.grants.rules import audit as grants_audit
from billing_service.ledger import rules as ledger


def create_quietly(url: str, count: int, **terms: Any) -> list[allowances.Allowance]:
    """`count` allowances for fresh users, none of them granted yet: the granter was down."""

    async def action(pool: Any) -> list[allowances.Allowance]:
        created = []
        for _ in range(count):
            allowance, _ = await allowances.create_allowance(
                pool, user_id=uuid.uuid4(), **{"amount": 100, "period": "day", **terms}, grant_now=False
            )
            created.append(allowance)
        return created

    return with_pool(url, action)


def assert_granted_once(conn: psycopg.Connection[Any], allowance: allowances.Allowance) -> None:
    """The allowance's current period, and only it, is granted: one period row, one credit, one grant."""
    now = datetime.now(UTC)
    start, _ = current_period(allowance.anchor, allowance.period, allowance.timezone, now)
    [(period_start, amount, _, grant_id)] = periods_of(conn, allowance.allowance_id)
    assert period_start == start and grant_id is not None
    assert credits_of(conn, allowance.allowance_id) == [(start.isoformat(), 1)]
    grants = conn.execute(
        "SELECT count(*), sum(amount) FROM grants WHERE user_id = %s AND source = 'allowance'", (allowance.user_id,)
    ).fetchone()
    assert grants == (1, amount)
    balance = conn.execute("SELECT balance FROM accounts WHERE user_id = %s", (allowance.user_id,)).fetchone()
    assert balance == (amount,)


def test_a_period_missed_while_nothing_ran_is_granted_once_when_the_granter_comes_back(quiet_database, db_quiet):
    # Anchored 3 days and 2 hours ago: three periods began while nothing ran; only the current one still
    # matters (the others' grants would have expired), and it is granted once, expiring when it ends.
    anchor = datetime.now(UTC) - timedelta(days=3, hours=2)
    [allowance] = create_quietly(quiet_database, 1, anchor=anchor, timezone="Asia/Kolkata")
    assert periods_of(db_quiet, allowance.allowance_id) == []
    assert with_pool(quiet_database, allowances.grant_due_periods) >= 1
    assert_granted_once(db_quiet, allowance)
    [(period_start, *_)] = periods_of(db_quiet, allowance.allowance_id)
    assert period_start == anchor + timedelta(days=3)
    expires_at = db_quiet.execute("SELECT expires_at FROM grants WHERE user_id = %s", (allowance.user_id,)).fetchone()
    assert expires_at == (anchor + timedelta(days=4),)
    # Coming back again changes nothing.
    with_pool(quiet_database, allowances.grant_due_periods)
    assert_granted_once(db_quiet, allowance)


def test_ten_concurrent_granters_grant_each_period_exactly_once(quiet_database, db_quiet):
    created = create_quietly(quiet_database, 20, rollover=True, period="week", timezone="America/Sao_Paulo")

    async def race(pool: Any) -> list[int]:
        return list(await asyncio.gather(*(allowances.grant_due_periods(pool) for _ in range(10))))

    credited = with_pool(quiet_database, race, size=16)
    # Every period was credited by exactly one of the ten; the other nine replayed that credit.
    assert sum(credited) == 20, credited
    for allowance in created:
        assert_granted_once(db_quiet, allowance)


def test_granter_processes_and_two_dispatchers_racing_grant_each_period_exactly_once(quiet_database, db_quiet):
    # Two processes that each run five granters at once, all released at the same instant, and two
    # `billing dispatch` (one leads and grants every 0.1 s), all on the same 40 due allowances.
    created = create_quietly(quiet_database, 40, period="month", timezone="America/Sao_Paulo", rollover=True)
    ids = [allowance.allowance_id for allowance in created]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": quiet_database, "BILLING_ALLOWANCE_GRANT_INTERVAL": "0.1"})
    racers = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "racer.py"), quiet_database],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    dispatchers = [
        subprocess.Popen(
            [sys.executable, "-m", "billing_service", "dispatch"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
        outputs = [racer.communicate("go\n", timeout=60)[0] for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), outputs
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            granted = db_quiet.execute(
                "SELECT count(*) FROM allowance_periods WHERE allowance_id = ANY(%s) AND grant_id IS NOT NULL", (ids,)
            ).fetchone()
            if granted == (len(ids),):
                break
            time.sleep(0.1)
    finally:
        for process in dispatchers:
            process.terminate()
        for process in dispatchers:
            process.wait(timeout=15)
    # The racers credited what the dispatchers did not; whoever credited, each period exactly once.
    assert sum(int(output) for output in outputs) <= len(ids), outputs
    for allowance in created:
        assert_granted_once(db_quiet, allowance)


def test_a_granter_that_died_after_its_claim_is_finished_by_the_next(quiet_database, db_quiet):
    [allowance] = create_quietly(quiet_database, 1)
    start, end = current_period(allowance.anchor, allowance.period, allowance.timezone, datetime.now(UTC))
    # Died after CLAIM_PERIOD, before the credit.
    db_quiet.execute(
        allowance_sql.CLAIM_PERIOD,
        {
            "user_id": allowance.user_id,
            "allowance_id": allowance.allowance_id,
            "period_start": start,
            "period_end": end,
            "previous_start": start - timedelta(days=1),
        },
    )
    [(_, _, _, grant_id)] = periods_of(db_quiet, allowance.allowance_id)
    assert grant_id is None
    with_pool(quiet_database, allowances.grant_due_periods)
    assert_granted_once(db_quiet, allowance)


def test_a_granter_that_died_after_its_credit_is_replayed_not_doubled(quiet_database, db_quiet):
    [allowance] = create_quietly(quiet_database, 1, rollover=True, rollover_cap=7)
    start, end = current_period(allowance.anchor, allowance.period, allowance.timezone, datetime.now(UTC))
    db_quiet.execute(
        allowance_sql.CLAIM_PERIOD,
        {
            "user_id": allowance.user_id,
            "allowance_id": allowance.allowance_id,
            "period_start": start,
            "period_end": end,
            "previous_start": start - timedelta(days=1),
        },
    )

    # Died after the credit, before RECORD_GRANT: the same credit the granter posts, under the period's key.
    async def credit_only(pool: Any) -> ledger.Posted:
        return await ledger.credit(
            pool,
            user_id=allowance.user_id,
            amount=100,
            description=allowance.description,
            metadata={
                "allowance_id": str(allowance.allowance_id),
                "period_start": start.isoformat(),
                "rolled_over": 0,
            },
            idempotency_key=allowances.idempotency_key(allowance.allowance_id, start),
            posted_by=allowances.POSTED_BY,
            terms=ledger.GrantTerms(priority=50, category="promotional", expires_at=end, source="allowance"),
        )

    posted = with_pool(quiet_database, credit_only)
    assert with_pool(quiet_database, allowances.grant_due_periods) == 0  # a replay, not a credit
    assert_granted_once(db_quiet, allowance)
    [(_, _, _, grant_id)] = periods_of(db_quiet, allowance.allowance_id)
    assert grant_id == posted.grant_id


def test_a_stopped_allowance_is_not_granted_on_comeback(quiet_database, db_quiet):
    [allowance] = create_quietly(quiet_database, 1)
    with_pool(quiet_database, lambda pool: allowances.stop_allowance(pool, allowance_id=allowance.allowance_id))
    with_pool(quiet_database, allowances.grant_due_periods)
    assert periods_of(db_quiet, allowance.allowance_id) == []
    assert credits_of(db_quiet, allowance.allowance_id) == []


def test_an_allowance_the_ledger_refuses_does_not_hold_up_the_others(quiet_database, db_quiet):
    full, fine = create_quietly(quiet_database, 2)

    async def fill(pool: Any) -> None:
        await ledger.credit(pool, user_id=full.user_id, amount=2**63 - 1 - 50, description="a whale")

    with_pool(quiet_database, fill)
    assert with_pool(quiet_database, allowances.grant_due_periods) >= 1  # 100 more would overflow the balance
    assert_granted_once(db_quiet, fine)
    assert credits_of(db_quiet, full.allowance_id) == []
    [(_, _, _, grant_id)] = periods_of(db_quiet, full.allowance_id)
    assert grant_id is None  # claimed, still due: granted once the balance has room


def test_the_quiet_database_audits_clean_after_all_the_races(quiet_database):
    # Last in this module (pytest keeps file order): every race above left the books exact.
    with psycopg.connect(quiet_database) as conn:
        assert ledger.audit(conn)[1] == []
        assert grants_audit(conn) == []
        assert allowances.audit(conn) == []


@pytest.fixture
def db_quiet(quiet_database: str) -> Any:
    with psycopg.connect(quiet_database, autocommit=True) as conn:
        yield conn
