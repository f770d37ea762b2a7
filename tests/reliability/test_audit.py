"""`billing audit`: finds drift and broken chains, names the account, exits non-zero; flat memory at scale."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from conftest import LiveServer, Postgres, fund, give_opening_grants

from .helpers import run_audit

BULK_ACCOUNTS = 1_000
BULK_TRANSACTIONS_PER_ACCOUNT = 1_000  # 1,000,000 ledger rows


@pytest.fixture
def ledger_of_three(own_server: LiveServer) -> list[uuid.UUID]:
    users = [uuid.uuid4() for _ in range(3)]
    with own_server.client() as http:
        for user_id in users:
            fund(http, user_id, 100)
            for amount in (10, 20, 30):
                response = http.post(
                    "/billing/charge-tokens", json={"user_id": str(user_id), "amount": amount, "description": "use"}
                )
                assert response.status_code == 200, response.text
    return users


@pytest.fixture
def repair(own_database: str) -> Iterator[psycopg.Connection]:
    """Direct SQL to corrupt the ledger on purpose; the corruption is undone afterwards for the next test."""
    with psycopg.connect(own_database, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE saved_accounts AS SELECT user_id, balance FROM accounts")
        conn.execute("CREATE TEMP TABLE saved_rows AS SELECT user_id, seq, balance_after FROM transactions")
        yield conn
        conn.execute("UPDATE accounts a SET balance = s.balance FROM saved_accounts s WHERE s.user_id = a.user_id")
        conn.execute(
            "UPDATE transactions t SET balance_after = s.balance_after FROM saved_rows s"
            " WHERE s.user_id = t.user_id AND s.seq = t.seq"
        )


def test_audit_is_clean_on_an_honest_ledger(own_database, ledger_of_three):
    result = run_audit(own_database)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DRIFT" not in result.stdout


def test_audit_names_an_account_whose_balance_drifts_and_exits_non_zero(own_database, ledger_of_three, repair):
    drifting = ledger_of_three[1]
    repair.execute("UPDATE accounts SET balance = balance + 7 WHERE user_id = %s", (drifting,))
    result = run_audit(own_database)
    assert result.returncode == 1, result.stdout + result.stderr
    drift_lines = [line for line in result.stdout.splitlines() if line.startswith("DRIFT")]
    assert len(drift_lines) == 1 and str(drifting) in drift_lines[0], result.stdout
    assert "balance 47, ledger sum 40" in drift_lines[0]


def test_audit_names_an_account_whose_balance_after_chain_is_broken(own_database, ledger_of_three, repair):
    # The sum and the stored balance still agree: only the chain of balance_after betrays the edit.
    broken = ledger_of_three[2]
    repair.execute(
        "UPDATE transactions SET balance_after = balance_after + 5 WHERE user_id = %s AND seq = 2", (broken,)
    )
    result = run_audit(own_database)
    assert result.returncode == 1, result.stdout + result.stderr
    drift_lines = [line for line in result.stdout.splitlines() if line.startswith("DRIFT")]
    assert len(drift_lines) == 1 and str(broken) in drift_lines[0], result.stdout
    assert re.search(r"broken balance_after links [1-9]", drift_lines[0]), drift_lines[0]


BULK_ACCOUNTS_SQL = """
INSERT INTO accounts (user_id, balance, last_seq)
SELECT md5('bulk' || a)::uuid, %(per_account)s, %(per_account)s FROM generate_series(1, %(accounts)s) AS a
"""
# One statement, a consistent chain: row s of each account credits 1, so its balance_after is s.
BULK_TRANSACTIONS = """
INSERT INTO transactions (user_id, seq, id, type, amount, balance_after, description)
SELECT md5('bulk' || a)::uuid, s, gen_random_uuid(), 'credit', 1, s, 'bulk'
FROM generate_series(1, %(accounts)s) AS a, generate_series(1, %(per_account)s) AS s
"""


def peak_rss_of_audit(database_url: str) -> tuple[int, int, str]:
    """Run `billing audit` under /usr/bin/time -v: (exit code, peak RSS in KiB, stdout)."""
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "billing_service", "audit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    assert match, result.stderr
    return result.returncode, int(match.group(1)), result.stdout


@pytest.mark.slow
def test_audit_runs_in_bounded_memory_over_a_million_transactions(postgres: Postgres):
    small_url, big_url = postgres.create_database(), postgres.create_database()
    try:
        for url in (small_url, big_url):
            migrate = subprocess.run(
                [sys.executable, "-m", "billing_service", "migrate"],
                env={**os.environ, "DATABASE_URL": url},
                capture_output=True,
                text=True,
                check=False,
            )
            assert migrate.returncode == 0, migrate.stderr
        with psycopg.connect(small_url, autocommit=True) as conn:
            conn.execute(BULK_ACCOUNTS_SQL, {"accounts": 10, "per_account": 100})
            conn.execute(BULK_TRANSACTIONS, {"accounts": 10, "per_account": 100})
            give_opening_grants(conn)
        started = time.monotonic()
        with psycopg.connect(big_url, autocommit=True) as conn:
            bulk = {"accounts": BULK_ACCOUNTS, "per_account": BULK_TRANSACTIONS_PER_ACCOUNT}
            conn.execute(BULK_ACCOUNTS_SQL, bulk)
            conn.execute(BULK_TRANSACTIONS, bulk)
            give_opening_grants(conn)
            rows = conn.execute("SELECT count(*) FROM transactions").fetchone()[0]
            conn.execute("ANALYZE")
        loaded = time.monotonic() - started
        assert rows == BULK_ACCOUNTS * BULK_TRANSACTIONS_PER_ACCOUNT

        small_code, small_rss, _ = peak_rss_of_audit(small_url)
        started = time.monotonic()
        big_code, big_rss, big_out = peak_rss_of_audit(big_url)
        audited = time.monotonic() - started
        assert small_code == 0 and big_code == 0, big_out

        # One broken link deep inside the million rows is still found, and its account named.
        with psycopg.connect(big_url, autocommit=True) as conn:
            victim = conn.execute("SELECT md5('bulk' || 777)::uuid").fetchone()[0]
            conn.execute(
                "UPDATE transactions SET balance_after = balance_after + 1 WHERE user_id = %s AND seq = 500", (victim,)
            )
        broken_code, broken_rss, broken_out = peak_rss_of_audit(big_url)
        print(
            f"\naudit: {rows} rows loaded in {loaded:.1f} s, audited in {audited:.1f} s;"
            f" peak RSS {big_rss // 1024} MiB (vs {small_rss // 1024} MiB over 1,000 rows,"
            f" {broken_rss // 1024} MiB when finding the broken link)"
        )
        assert broken_code == 1 and f"DRIFT {victim}" in broken_out, broken_out
        # Streaming means the million rows never come to Python: peak memory is the interpreter's, not the data's.
        assert big_rss < small_rss + 64 * 1024, (small_rss, big_rss)
        assert broken_rss < small_rss + 64 * 1024, (small_rss, broken_rss)
    finally:
        postgres.drop_database(small_url)
        postgres.drop_database(big_url)
