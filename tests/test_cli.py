"""`billing` as an operator runs it: real subprocesses against a real database of their own.

Each `billing` run is a fresh Python process (a few seconds on a busy machine), so every test here makes
as few runs as proves its point; fixtures and corruption are set up with direct SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from billing_service import db as billing_db
from conftest import free_port, give_opening_grants


def billing(database_url: str, *args: str, cwd=None, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_") and k != "DATABASE_URL"}
    env["DATABASE_URL"] = database_url
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-m", "billing_service", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


def assert_clear_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") or "Error" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture(scope="module")
def cli_database(postgres):
    """A database of this module's own: the audit reads every account, so no other test's rows may count."""
    url = postgres.create_database()
    migrated = billing(url, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("applied ")
    applied = migrated.stdout.removeprefix("applied ").strip().split(", ")
    assert applied[0] == "0001" and applied == sorted(applied), "migrations are listed in the order they ran"
    yield url
    postgres.drop_database(url)


def test_migrate_on_a_current_schema_says_so(cli_database):
    result = billing(cli_database, "migrate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "schema is current"


def test_credit_charge_balance_history_and_a_clean_audit(cli_database):
    user = str(uuid.uuid4())
    credited = billing(cli_database, "credit", user, "100", "-d", "welcome")
    assert credited.returncode == 0, credited.stderr
    assert ": balance 100, grant " in credited.stdout

    charged = billing(cli_database, "charge", user, "30", "--description", "run 1", "--idempotency-key", "op-1")
    assert charged.returncode == 0, charged.stderr
    assert charged.stdout.strip().endswith("balance 70")

    balance = billing(cli_database, "balance", user)
    assert balance.returncode == 0, balance.stderr
    assert balance.stdout.strip() == f"{user}: 70"

    history = billing(cli_database, "history", user)
    assert history.returncode == 0, history.stderr
    rows = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(row["type"], row["amount"], row["balance_after"], row["description"]) for row in rows] == [
        ("debit", -30, 70, "run 1"),
        ("credit", 100, 100, "welcome"),
    ]

    audit = billing(cli_database, "audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "all balances equal their ledgers" in audit.stdout


def test_a_refused_charge_is_a_clear_error_and_moves_nothing(cli_database):
    user = uuid.uuid4()
    with psycopg.connect(cli_database, autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (user_id, balance, last_seq) VALUES (%s, 5, 1)", (user,))
        conn.execute(
            "INSERT INTO transactions (user_id, seq, type, amount, balance_after, description)"
            " VALUES (%s, 1, 'credit', 5, 5, 'seed')",
            (user,),
        )
        give_opening_grants(conn)
        assert_clear_error(billing(cli_database, "charge", str(user), "6"), "insufficient_balance")
        assert conn.execute("SELECT balance FROM accounts WHERE user_id = %s", (user,)).fetchone() == (5,)


def test_an_amount_out_of_bounds_is_refused_before_touching_money(cli_database):
    user = uuid.uuid4()
    assert_clear_error(billing(cli_database, "credit", str(user), "0"), "Invalid value")
    with psycopg.connect(cli_database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM accounts WHERE user_id = %s", (user,)).fetchone() == (0,)


def test_audit_names_the_accounts_a_corrupted_row_broke(postgres):
    url = postgres.create_database()
    try:
        billing_db.migrate(url)
        healthy, bad_amount, bad_balance = (uuid.uuid4() for _ in range(3))
        with psycopg.connect(url, autocommit=True) as conn:
            for user in (healthy, bad_amount, bad_balance):
                # A consistent ledger: credit 50, then debit 20.
                conn.execute("INSERT INTO accounts (user_id, balance, last_seq) VALUES (%s, 30, 2)", (user,))
                conn.execute(
                    "INSERT INTO transactions (user_id, seq, type, amount, balance_after, description)"
                    " VALUES (%s, 1, 'credit', 50, 50, 'in'), (%s, 2, 'debit', -20, 30, 'out')",
                    (user, user),
                )
            give_opening_grants(conn)
            conn.execute("UPDATE transactions SET amount = -25 WHERE user_id = %s AND seq = 2", (bad_amount,))
            conn.execute("UPDATE accounts SET balance = 31 WHERE user_id = %s", (bad_balance,))
        audit = billing(url, "audit")
        assert audit.returncode == 1, audit.stdout + audit.stderr
        drifting = [line for line in audit.stdout.splitlines() if line.startswith("DRIFT")]
        assert len(drifting) == 2, audit.stdout
        amount_line = next(line for line in drifting if str(bad_amount) in line)
        assert "ledger sum 25" in amount_line and "broken balance_after links 1" in amount_line
        assert any(str(bad_balance) in line and "balance 31" in line for line in drifting), audit.stdout
        assert str(healthy) not in audit.stdout
        assert "2 of 3 accounts drift" in audit.stdout
    finally:
        postgres.drop_database(url)


def test_an_unreachable_database_is_a_clear_error(tmp_path):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=3"
    assert_clear_error(billing(dead, "balance", str(uuid.uuid4()), cwd=tmp_path), "cannot reach the database")


def test_pending_migrations_are_a_clear_error(postgres):
    url = postgres.create_database()
    try:
        assert_clear_error(billing(url, "balance", str(uuid.uuid4())), "lacks migrations", "billing migrate")
    finally:
        postgres.drop_database(url)


def test_serve_refuses_an_external_database_without_service_tokens(cli_database, tmp_path):
    result = billing(cli_database, "serve", "--port", str(free_port()), cwd=tmp_path, BILLING_SERVICE_TOKENS="")
    assert_clear_error(result, "BILLING_SERVICE_TOKENS", "refusing to start")


def test_a_description_out_of_bounds_is_refused_before_touching_money(cli_database):
    user = uuid.uuid4()
    assert_clear_error(billing(cli_database, "credit", str(user), "5", "-d", ""), "1 to 1,000 characters")
    assert_clear_error(billing(cli_database, "credit", str(user), "5", "-d", "x" * 1001), "1 to 1,000 characters")
    with psycopg.connect(cli_database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM accounts WHERE user_id = %s", (user,)).fetchone() == (0,)


def test_a_credit_from_the_cli_is_a_grant_with_the_apis_terms_and_bounds(cli_database):
    user = uuid.uuid4()
    granted = billing(
        cli_database,
        "credit",
        str(user),
        "40",
        "--priority",
        "10",
        "--category",
        "promotional",
        "--expires-at",
        "2099-01-01T00:00:00+00:00",
    )
    assert granted.returncode == 0, granted.stdout + granted.stderr
    assert ", grant " in granted.stdout
    assert_clear_error(
        billing(cli_database, "credit", str(user), "5", "--expires-at", "2001-01-01T00:00:00+00:00"),
        "expires_at_in_past",
    )
    assert_clear_error(billing(cli_database, "credit", str(user), "5", "--category", "gift"), "paid or promotional")
    with psycopg.connect(cli_database, autocommit=True) as conn:
        grant = conn.execute(
            "SELECT amount, priority, category, expires_at IS NOT NULL FROM grants WHERE user_id = %s", (user,)
        ).fetchall()
    assert grant == [(40, 10, "promotional", True)]
