"""What every reliability suite checks, straight from the tables (never through the service under test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg

# Independent of the service's own audit SQL, so a bug there cannot hide a bug here.
LEDGER_VIOLATIONS = """
WITH chain AS (
    SELECT user_id, seq, amount, balance_after,
           lag(balance_after, 1, 0::bigint) OVER w AS previous_balance_after,
           lag(seq, 1, 0::bigint) OVER w AS previous_seq
    FROM transactions
    WINDOW w AS (PARTITION BY user_id ORDER BY seq)
),
ledger AS (
    SELECT user_id, sum(amount) AS ledger_sum, max(seq) AS last_seq FROM transactions GROUP BY user_id
)
SELECT 'broken balance_after chain', user_id::text, seq
FROM chain
WHERE balance_after - amount <> previous_balance_after OR seq <> previous_seq + 1
UNION ALL
SELECT 'negative balance_after', user_id::text, seq FROM chain WHERE balance_after < 0
UNION ALL
SELECT 'balance differs from ledger sum', a.user_id::text, a.balance
FROM accounts a LEFT JOIN ledger l USING (user_id)
WHERE a.balance <> coalesce(l.ledger_sum, 0) OR a.last_seq <> coalesce(l.last_seq, 0)
UNION ALL
SELECT 'negative balance', user_id::text, balance FROM accounts WHERE balance < 0
"""

NON_NEGATIVE_CHECK = """
SELECT count(*) FROM pg_constraint
WHERE conrelid = 'accounts'::regclass AND conname = 'balance_never_negative' AND convalidated
"""


def ledger_violations(database_url: str) -> list[tuple[str, str, int]]:
    """Every broken invariant, read in one snapshot so a check can run while money moves."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = [(str(kind), str(user), int(at)) for kind, user, at in conn.execute(LEDGER_VIOLATIONS)]
        check = conn.execute(NON_NEGATIVE_CHECK).fetchone()
    if not check or check[0] != 1:
        rows.append(("CHECK (balance >= 0) missing or not validated", "accounts", 0))
    return rows


def run_audit(database_url: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`billing audit` exactly as an operator runs it."""
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "billing_service", "audit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def worker_processes(server_pid: int) -> list[psutil.Process]:
    """The uvicorn workers of a `billing serve`: its multiprocessing children, minus the resource tracker."""
    workers = []
    for child in psutil.Process(server_pid).children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def kill_process_group(pid: int) -> None:
    """kill -9 of the server and everything it started (it runs in its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# The kinds of acknowledged write that take tokens out of a balance.
DEBITS = frozenset({"charge", "capture"})


@dataclass
class Acked:
    """One acknowledged ledger write, as the client saw it."""

    key: str
    kind: str  # "charge", "capture", "credit" or "refund"
    user_id: str
    amount: int
    transaction_id: str
    balance: int


@dataclass
class ClientLog:
    """What a client knows for certain: acknowledged writes, refused charges, and anything unexpected."""

    acked: dict[str, Acked] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    requests: int = 0
    replays: int = 0

    def record(self, key: str, kind: str, user_id: str, amount: int, body: dict[str, Any]) -> None:
        """An acknowledged answer. A second ack for the same key must name the same transaction."""
        ack = Acked(key, kind, user_id, amount, body["transaction_id"], body["balance"])
        first = self.acked.setdefault(key, ack)
        if first.transaction_id != ack.transaction_id or first.balance != ack.balance:
            self.violations.append(f"key {key} acknowledged twice with different results: {first} vs {ack}")


def merge(logs: list[ClientLog]) -> ClientLog:
    merged = ClientLog()
    for log in logs:
        for key, ack in log.acked.items():
            if key in merged.acked and merged.acked[key] != ack:
                merged.violations.append(f"key {key} acknowledged to two clients differently")
            merged.acked.setdefault(key, ack)
        merged.refused |= log.refused
        merged.violations += log.violations
        merged.requests += log.requests
        merged.replays += log.replays
    return merged


def model_violations(database_url: str, log: ClientLog, user_ids: list[str]) -> list[str]:
    """The ledger against the clients' acknowledgements: each acked write is there once, as acknowledged;
    nothing else is; and each balance is the acked credits minus the acked debits."""
    violations = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT idempotency_key, id::text, user_id::text, amount, balance_after, type FROM transactions"
            " WHERE user_id = ANY(%s::uuid[])",
            (user_ids,),
        ).fetchall()
        balances = dict(
            conn.execute(
                "SELECT user_id::text, balance FROM accounts WHERE user_id = ANY(%s::uuid[])", (user_ids,)
            ).fetchall()
        )
    by_key: dict[str | None, list[tuple[Any, ...]]] = {}
    written_off = dict.fromkeys(user_ids, 0)
    for row in rows:
        if row[0] is None and row[5] in ("expiry", "void"):
            # Grants expiring: no client asked for these rows; `billing audit` proves each one per grant.
            written_off[row[2]] += row[3]
            continue
        by_key.setdefault(row[0], []).append(row)
    for key, ack in log.acked.items():
        found = by_key.get(key, [])
        if len(found) != 1:
            violations.append(f"acked {ack.kind} {key} is in the ledger {len(found)} times")
            continue
        _, transaction_id, user_id, amount, balance_after, _ = found[0]
        signed = -ack.amount if ack.kind in DEBITS else ack.amount
        if (transaction_id, user_id, amount, balance_after) != (ack.transaction_id, ack.user_id, signed, ack.balance):
            violations.append(f"acked {key} differs from its row: {ack} vs {found[0]}")
    for key, found in by_key.items():
        if key not in log.acked:
            violations.append(f"ledger row(s) nobody acknowledged: key {key}, {len(found)} row(s)")
    for key in log.refused:
        if key in by_key and key not in log.acked:
            violations.append(f"refused charge {key} left a ledger row")
    expected = written_off  # minus what expired
    for ack in log.acked.values():
        expected[ack.user_id] += -ack.amount if ack.kind in DEBITS else ack.amount
    for user_id in user_ids:
        if balances.get(user_id) != expected[user_id]:
            violations.append(
                f"{user_id}: balance {balances.get(user_id)} != acked credits + refunds - debits - expiries "
                f"{expected[user_id]}"
            )
    return violations
