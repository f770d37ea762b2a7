"""The side-by-side benchmark: the service, a bare reference app and pgbench, on one machine and database, in one run.

    ./scripts/bench [--workers 1,2,4] [--duration 10] [--rounds 2] [--connections 32] [--database-url URL]
                    [--workloads charge_spread,charge_hot,balance,capture,charge_grants] [--skip-history]
                    [--reference-server granian|uvicorn] [--reference-driver psycopg|asyncpg] [--compare-reference]
                    [--service-variant NAME:ENV=VALUE] [--in-process]

It starts PostgreSQL (embedded, or a fresh database on --database-url, dropped afterwards), migrates, seeds
1,000 accounts with one grant each, 1,000 with 5 live grants each (charge_grants: a charge draws the first
of 5 grant slots), one funded account per connection for the holds of the capture workload, and one user
with a 1,000,000-row history. Then:

- pgbench runs the service's exact statements (billing_service.ledger.sql / holds.sql, imported, never
  copied) at the same concurrency: PostgreSQL's own limit, with no HTTP and no Python;
- for each worker count, `billing serve --workers N` (its default config: access log, metrics, auth) and
  bench/reference_app.py (the same statements in a bare ASGI app on granian or uvicorn, same worker count)
  are each driven by wrk (C; Lua scripts in bench/wrk/): charges spread over 1,000 users, charges to one hot
  user, balance reads, hold captures, charges to accounts with 5 grants; in --rounds passes, every other one
  in reverse order (service, reference, reference, service), and each server's rounds averaged;
- around every workload it samples PostgreSQL's CPU time (its server processes for this database, plus its
  background processes) and reports it per operation; after every write workload it counts the ledger rows
  carrying that workload's Idempotency-Keys against the acknowledged requests; after each server it runs
  `billing audit`.

--in-process replaces the wrk runs by bench/inprocess.py: each app's own CPU per request, driven in-process.

synchronous_commit and fsync are asserted on: every acknowledged charge is on disk. Results go to
bench/results/latest.json and a table. Numbers from a shared 2-core machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import psycopg

from billing_service.holds import sql as holds_sql
from billing_service.ledger import sql as ledger_sql

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOKEN = "bench-service-token"  # noqa: S105 - the throwaway servers the bench starts and stops
ACCOUNTS = 1000
HOT_USER = "00000000-0000-4000-8000-000000000001"
HISTORY_USER = "00000000-0000-4000-9000-000000000001"
HISTORY_ROWS = 1_000_000
HOLD_AMOUNT = 10**9
HOLD_TTL_SECONDS = 86_400
WRK_THREADS = 2
# charge_grants runs right after charge_spread: its target is a ratio to it, and neighbours share the machine's
# state (a workload after the capture run measured up to 15% lower than the same workload run first).
WORKLOADS = ("charge_spread", "charge_grants", "charge_hot", "balance", "capture")
WRITES = ("charge_spread", "charge_hot", "capture", "charge_grants")
# charge_grants: 1,000 other users, each with 5 live grants (issue #11: within 15% of charge_spread's 1 grant).
GRANTS_USERS = range(2001, 2001 + ACCOUNTS)
GRANTS_EACH = 5
# What each workload is called in the table, and its wrk script and mode.
LABELS = {
    "charge_spread": "charges, 1,000 users",
    "charge_hot": "charges, hot user",
    "balance": "balance reads",
    "capture": "hold captures",
    "charge_grants": "charges, 5 grants each",
}
SCRIPTS = {
    "charge_spread": ("charge.lua", "spread"),
    "charge_hot": ("charge.lua", "hot"),
    "balance": ("balance.lua", "spread"),
    "capture": ("capture.lua", "holds"),
    "charge_grants": ("charge.lua", "grants"),
}
# Issue #9's targets: (workload, figure, baseline or None, bound).
TARGETS = [
    ("charge_spread", "acked_rps", "reference", 0.9),
    ("balance", "acked_rps", "reference", 0.9),
    ("charge_hot", "acked_rps", "pgbench", 1.4),
    ("capture", "acked_rps", "reference", 0.9),
    ("charge_spread", "p99_ms", None, 30.0),
    ("balance", "p99_ms", None, 15.0),
    ("charge_grants", "acked_rps", "service:charge_spread", 0.85),
]
CAPTURE_METADATA = {"run_id": "bench-run", "model": "bench-model", "input_tokens": 10, "output_tokens": 2}


def user_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def user_sql_expr(variable: str) -> str:
    """The SQL expression pgbench uses for a seeded user id, from its integer variable."""
    return f"('00000000-0000-4000-8000-' || lpad(:{variable}::text, 12, '0'))::uuid"


# ---------------------------------------------------------------------------------------------------------
# The database


class Database:
    """The bench's database: its URL, the pgbench that matches its server, and PostgreSQL's CPU meter."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.server: Any = None
        self.admin_url: str | None = args.database_url
        if args.database_url:
            self.name = f"billing_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = urlunsplit(urlsplit(args.database_url)._replace(path=f"/{self.name}"))
            self.pgbench = shutil.which("pgbench") or "pgbench"
            self.kind = "external"
        else:
            import pgserver
            from pgserver._commands import POSTGRES_BIN_PATH

            self.server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="billing-bench-pg-")), cleanup_mode="delete")
            self.name = "billing_bench"
            with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE billing_bench")
            self.url = self.server.get_uri("billing_bench")
            self.pgbench = str(POSTGRES_BIN_PATH / "pgbench")
            self.kind = "embedded"
        with psycopg.connect(self.url, autocommit=True) as conn:
            settings = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit')"
                ).fetchall()
            )
            self.version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            self.postmaster = psutil.Process(psutil.Process(backend).ppid())
        # Honesty: every acknowledged write must be on disk.
        assert settings == {"fsync": "on", "synchronous_commit": "on"}, settings

    # Background processes serve every database; client backends and autovacuum workers name theirs.
    _SHARED = (
        "checkpointer",
        "background writer",
        "walwriter",
        "autovacuum launcher",
        "logical replication launcher",
        "archiver",
    )

    def cpu_seconds(self, exited: bool = False) -> float:
        """User + system CPU of the postmaster, its background processes, and this database's backends.

        Backends of other databases (other people's tests on a shared server) are left out. A backend that
        exits between two samples is only counted with `exited`, through the CPU the kernel adds to the
        postmaster when it reaps it (of whichever database): pgbench's backends are gone when it returns,
        while the servers' pooled connections stay open through a workload.
        """
        return sum(self.cpu_breakdown(exited).values())

    def cpu_breakdown(self, exited: bool = False) -> dict[str, float]:
        """`cpu_seconds` split three ways: this database's client backends; its autovacuum workers; and the
        processes every database shares (postmaster, checkpointer, walwriter, ...), which also work for
        other people's databases on a shared server and for whatever the previous workload left to flush."""
        parts = {"backends": 0.0, "autovacuum": 0.0, "shared": 0.0}
        if exited:
            reaped = self.postmaster.cpu_times()
            parts["backends"] += reaped.children_user + reaped.children_system
        for process in [self.postmaster, *self.postmaster.children()]:
            try:
                part = "shared"
                if process is not self.postmaster:
                    title = " ".join(process.cmdline()).strip()
                    # "postgres: checkpointer", or "postgres: 15/main: checkpointer" for a Debian cluster
                    shared = any(title.endswith(f": {name}") for name in self._SHARED)
                    if not shared and f" {self.name} " not in f"{title} ":
                        continue
                    if not shared:
                        part = "autovacuum" if "autovacuum worker" in title else "backends"
                times = process.cpu_times()
                parts[part] += times.user + times.system
            except psutil.Error:
                continue
        return parts

    def close(self, keep: bool) -> None:
        if self.admin_url and not keep:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


SEED = [
    """INSERT INTO accounts (user_id, balance, last_seq)
       SELECT ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 1000000000000, 1
       FROM generate_series(1, %(accounts)s) AS n""",
    """INSERT INTO transactions (user_id, seq, type, amount, balance_after, description)
       SELECT ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 1, 'credit', 1000000000000,
              1000000000000, 'bench funding'
       FROM generate_series(1, %(accounts)s) AS n""",
    "INSERT INTO accounts (user_id, balance, last_seq) VALUES (%(history_user)s, %(rows)s, %(rows)s)",
    """INSERT INTO transactions (user_id, seq, type, amount, balance_after, description, created_at)
       SELECT %(history_user)s, n, 'credit', 1, n, 'bench history row ' || n,
              now() - interval '1 second' * (%(rows)s - n)
       FROM generate_series(1, %(rows)s) AS n""",
    # Each account's tokens in one grant (what migration 0006 gives accounts that predate grants), so charges
    # draw down one grant slot.
    """WITH opened AS (
           INSERT INTO grants (user_id, amount, priority, category, source)
           SELECT user_id, balance, 50, 'paid', 'opening' FROM accounts
           RETURNING user_id, id, priority, created_at
       )
       UPDATE accounts a
       SET grants = ARRAY[ROW(o.id, a.balance, o.priority, NULL, o.created_at)::billing_grant_slot]
       FROM opened o WHERE a.user_id = o.user_id""",
]


def seed(url: str, args: argparse.Namespace) -> None:
    """1,000 funded accounts plus one per connection for holds, and a user with a 1,000,000-row history."""
    subprocess.run(
        [sys.executable, "-m", "billing_service", "migrate"], env={**os.environ, "DATABASE_URL": url}, check=True
    )
    params = {"accounts": ACCOUNTS + args.connections, "history_user": HISTORY_USER, "rows": HISTORY_ROWS}
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SEED:
            conn.execute(statement, params)  # type: ignore[arg-type]
        # charge_grants' accounts: 5 live grants each, by the service's own CREDIT (4 promotional ones that
        # expire in 30 days at priorities 10..40, then a paid one), so each charge draws the first of 5 slots.
        expires = datetime.now(UTC) + timedelta(days=30)
        with conn.pipeline():
            for n in GRANTS_USERS:
                for priority in range(10, 10 * GRANTS_EACH + 1, 10):
                    conn.execute(
                        ledger_sql.CREDIT,
                        {
                            "user_id": user_id(n),
                            "amount": 10**11,
                            "description": "bench grant",
                            "metadata": None,
                            "idempotency_key": None,
                            "request_hash": None,
                            "posted_by": "bench",
                            "request_id": None,
                            "events": True,
                            "default_threshold": None,
                            "priority": priority,
                            "category": "paid" if priority == 10 * GRANTS_EACH else "promotional",
                            "expires_at": None if priority == 10 * GRANTS_EACH else expires,
                            "source": "credit",
                        },
                    )
        conn.execute("VACUUM ANALYZE")


def create_holds(url: str, args: argparse.Namespace, description: str) -> list[str]:
    """One root hold per wrk connection, each on its own funded account (users 1001...)."""
    return create_holds_on(url, range(ACCOUNTS + 1, ACCOUNTS + args.connections + 1), description)


def create_holds_on(url: str, users: range, description: str, ttl_seconds: int = HOLD_TTL_SECONDS) -> list[str]:
    """A root hold on each of these seeded accounts, by the service's own HOLD_CREATE: accounts.held moves with
    the hold, so `billing audit` still adds up."""
    hold_ids = []
    with psycopg.connect(url, autocommit=True) as conn:
        for n in users:
            params = {
                "user_id": user_id(n),
                "amount": HOLD_AMOUNT,
                "description": description,
                "ttl_seconds": ttl_seconds,
                "metadata": None,
                "idempotency_key": None,
                "request_hash": None,
                "events": True,
                "posted_by": "bench",
                "request_id": None,
            }
            outcome, hold_id, *_ = conn.execute(holds_sql.HOLD_CREATE, params).fetchone()  # type: ignore[misc]
            assert outcome == "applied", outcome
            hold_ids.append(str(hold_id))
    return hold_ids


def ledger_rows(url: str, nonce: str) -> int:
    """Ledger rows written under one workload's Idempotency-Keys (bench-<nonce>-<thread>-<n>)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM transactions WHERE idempotency_key LIKE %s", (f"bench-{nonce}-%",)
        ).fetchone()
    return int(row[0]) if row else 0


def skip_feed(url: str) -> None:
    """Move the dispatcher's position to the head of the events feed. pgbench and the reference app run the
    service's statements, events outbox included, but fan nothing out: without this, the service's dispatcher
    would spend its run fanning out their tens of thousands of events (about 19 µs of PostgreSQL CPU each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE dispatcher_state s SET txid = e.txid, user_id = e.user_id, seq = e.seq"
            " FROM (SELECT txid, user_id, seq FROM events ORDER BY txid DESC, user_id DESC, seq DESC LIMIT 1) e"
            " WHERE s.id = 1"
        )


def audit(url: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "billing_service", "audit"],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
    return result.returncode == 0


# ---------------------------------------------------------------------------------------------------------
# The servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_ready(process: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {LOGS}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"{what} did not become ready")


LOGS = Path(tempfile.gettempdir()) / "billing-bench-logs"


_LOGS_STARTED: set[str] = set()


def log_file(name: str) -> Any:
    """Where a server's output goes (not the terminal: the service's access log is one line per request).
    Each bench run starts its logs afresh and appends across its own passes: one run's access lines alone
    reach a gigabyte."""
    LOGS.mkdir(exist_ok=True)
    mode = "ab" if name in _LOGS_STARTED else "wb"
    _LOGS_STARTED.add(name)
    return (LOGS / f"{name}.log").open(mode)


def start_service(
    url: str, workers: int, port: int, overrides: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # The service's default config (access log, metrics, auth); BILLING_BATCH_CHARGES and friends pass through.
    # The rate limits stay on (their check and their sync cost is measured) but far above what wrk sends: they
    # are a per-caller policy, and the defaults (2,000 writes/s per token, 1,000 per account) would measure the
    # policy instead of the ledger.
    env = {
        "BILLING_RATE_LIMIT_TOKEN_RATE": "1000000",
        "BILLING_RATE_LIMIT_TOKEN_BURST": "2000000",
        "BILLING_RATE_LIMIT_USER_RATE": "1000000",
        "BILLING_RATE_LIMIT_USER_BURST": "2000000",
        **os.environ,
        "DATABASE_URL": url,
        "BILLING_SERVICE_TOKENS": TOKEN,
        "BILLING_LOG_FORMAT": "json",
    }
    env.update(overrides or {})
    skip_feed(url)  # its dispatcher fans out its own events, not those pgbench and the reference app wrote
    with log_file("service") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "billing_service", "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    wait_ready(process, port, "the service")
    return process


def reference_command(server: str, workers: int, port: int) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    if server == "granian":
        granian = Path(sys.executable).parent / "granian"
        return [
            str(granian) if granian.exists() else "granian",
            "--interface",
            "asgi",
            "--loop",
            "uvloop",
            "--no-ws",
            "--working-dir",
            str(HERE),
            *common,
            "reference_app:app",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(HERE),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        *common,
        "reference_app:app",
    ]


def start_reference(url: str, workers: int, port: int, server: str, driver: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "REF_TOKEN": TOKEN, "REF_DRIVER": driver}
    with log_file("reference") as log:
        process = subprocess.Popen(
            reference_command(server, workers, port), env=env, stdout=log, stderr=log, start_new_session=True
        )
    wait_ready(process, port, f"the reference app ({server}, {driver})")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the group is the server and its workers
        process.wait()


# ---------------------------------------------------------------------------------------------------------
# Load


def wrk(
    workload: str, port: int, args: argparse.Namespace, holds_file: Path | None, duration: int | None = None
) -> dict[str, Any]:
    script, mode = SCRIPTS[workload]
    nonce = uuid.uuid4().hex[:12]
    # Captures: one wrk thread per connection, so each connection streams captures into a hold of its own, as
    # an agent run does. With two threads sharing the holds, concurrent requests met on a tree lock.
    threads = args.connections if workload == "capture" else WRK_THREADS
    command = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(args.connections),
        "-d",
        f"{duration or args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "wrk" / script),
        f"http://127.0.0.1:{port}",
        "--",
        TOKEN,
        mode,
        nonce,
        str(holds_file or ""),
        str(threads),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    seconds = result["duration_us"] / 1e6
    return {
        "rps": round(result["requests"] / seconds, 1),
        # What the targets compare: a 429 or a 503 answered fast must not count as throughput.
        "acked_rps": round((result["requests"] - result["non_2xx"]) / seconds, 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "non_2xx": result["non_2xx"] + result["socket_errors"],
        "socket_errors": result["socket_errors"],
        "requests": result["requests"],
        "acked": result["requests"] - result["non_2xx"],
        "nonce": nonce,
    }


def one_line(statement: str, params: dict[str, str]) -> str:
    """A service statement, verbatim, with SQL expressions in place of its bound parameters, on one line
    (pgbench reads a statement per line), SQL comments dropped."""
    text = statement
    for name, expression in params.items():
        text = text.replace(f"%({name})s", f"({expression})")
    assert "%(" not in text, re.findall(r"%\(\w+\)s", text)
    lines = (re.sub(r"--.*$", "", line).strip() for line in text.strip().splitlines())
    return " ".join(line for line in lines if line)


# pgbench variables in place of each statement's bound parameters. A value with `: ` (JSON) keeps pgbench
# from reading `:name` inside it as a variable.
_KEY = "'pgb-' || :client_id || '-' || :key"
_HASH = "'\\x00'::bytea"
# The service's defaults: the outbox on, and a caller recorded on every row.
_OUTBOX_AND_CALLER = {"events": "true", "posted_by": "'pgbench'::text", "request_id": "NULL::text"}


def pgbench_script(workload: str) -> str:
    """The pgbench script for a workload: the service's exact statements, pgbench variables for parameters."""
    header = f"\\set n random(1, {ACCOUNTS})\n\\set key random(1, 9000000000000000000)\n"
    if workload in ("charge_spread", "charge_hot", "charge_grants"):
        who = f"'{HOT_USER}'::uuid" if workload == "charge_hot" else user_sql_expr("n")
        if workload == "charge_grants":
            header = f"\\set n random({GRANTS_USERS.start}, {GRANTS_USERS.stop - 1})\n" + header.split("\n", 1)[1]
        params = {
            "user_id": who,
            "amount": "1",
            "description": "'pgbench charge'",
            "metadata": "NULL::jsonb",
            "idempotency_key": _KEY,
            "request_hash": _HASH,
            **_OUTBOX_AND_CALLER,
        }
        return header + one_line(ledger_sql.CHARGE, params) + ";\n"
    if workload == "balance":
        return header + one_line(ledger_sql.BALANCE_WITH_HOLDS, {"user_id": user_sql_expr("n")}) + ";\n"
    # capture: the service's transaction, statement for statement (holds/rules.py capture()). The hold is
    # found by the account its pgbench hold was made on (one lookup folded into LOCK_TREE's parameter); its
    # user_id and root_id come back from LOCK_TREE through \gset, as the service reads them.
    pgbench_hold = "AND description = 'pgbench hold' AND status = 'active' LIMIT 1"
    hold_of = " ".join(("SELECT id FROM holds WHERE user_id =", user_sql_expr("h"), pgbench_hold))
    tree = {"user_id": ":user_id::uuid", "root_id": ":root_id::uuid", "events": "true"}
    metadata = "'" + json.dumps(CAPTURE_METADATA, separators=(",", ": ")) + "'::jsonb"
    capture = {
        **tree,
        "hold_id": ":root_id::uuid",
        "amount": "1",
        "description": "NULL::text",
        "metadata": metadata,
        "final": "false",
        "allow_overrun": "false",
        "idempotency_key": _KEY,
        "request_hash": _HASH,
        **_OUTBOX_AND_CALLER,
    }
    return (
        # Client c streams into the hold of account 1001 + c, as wrk's connection c does (one hold per run).
        f"\\set h {ACCOUNTS + 1} + :client_id\n\\set key random(1, 9000000000000000000)\n"
        "BEGIN;\n"
        + one_line(holds_sql.LOCK_TREE, {"hold_id": hold_of})
        + " \\gset\n"
        + one_line(holds_sql.SWEEP_TREE, tree)
        + ";\n"
        + one_line(holds_sql.HOLD_CAPTURE, capture)
        + ";\n"
        + one_line(holds_sql.HOLD, {"hold_id": ":root_id::uuid"})
        + ";\nCOMMIT;\n"
    )


def pgbench(db: Database, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(pgbench_script(workload))
    command = [db.pgbench, "-n", "-M", "prepared", "-c", str(args.connections), "-j", str(WRK_THREADS)]
    command += ["-T", str(args.duration), "-f", script.name, db.url]
    before = db.cpu_seconds(exited=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    time.sleep(0.2)  # the postmaster reaps pgbench's backends
    cpu = db.cpu_seconds(exited=True) - before
    os.unlink(script.name)
    if completed.returncode != 0:
        raise RuntimeError(f"pgbench {workload} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")
    output = completed.stdout

    def figure(pattern: str) -> float:
        match = re.search(pattern, output)
        return float(match.group(1)) if match else 0.0

    tps = figure(r"tps = ([\d.]+)")
    done = figure(r"number of transactions actually processed: (\d+)")
    return {
        "tps": round(tps, 1),
        "avg_ms": figure(r"latency average = ([\d.]+) ms"),
        "failed": int(figure(r"number of failed transactions: (\d+)")),
        "transactions": int(done),
        "pg_cpu_us_per_op": round(cpu / done * 1e6, 1) if done else None,
    }


def server_cpu_seconds(server: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU of a server and its worker processes (alive ones: workers live through a run)."""
    if server is None:
        return 0.0
    total = 0.0
    try:
        processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def settle(url: str) -> None:
    """The same starting state for every measured run: VACUUM (the dead row versions the previous run's updates
    left on accounts, holds and the rest, which the next run would otherwise prune as it goes), then CHECKPOINT
    if this role may (a superuser, or pg_checkpoint on PostgreSQL 15+), so no run pays for full-page images of
    pages a checkpoint started in the middle of it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass


def drive(
    db: Database,
    port: int,
    workloads: list[str],
    args: argparse.Namespace,
    label: str,
    server: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """Every selected workload against one running server, each measured, PostgreSQL's and the server's CPU
    sampled around it, and each write reconciled with the ledger."""
    figures: dict[str, Any] = {}
    for workload in workloads:
        holds_file = None
        if workload == "capture":
            holds_file = Path(tempfile.mkstemp(prefix="bench-holds-", suffix=".txt")[1])
            holds_file.write_text("\n".join(create_holds(db.url, args, f"bench hold {label}")) + "\n")
        # Every workload starts from a vacuumed, checkpointed database: otherwise the server that ran first after
        # the seeding and pgbench paid for their leftovers (PostgreSQL CPU per charge 357-410 against 200-239 µs
        # for the same code, first pass against last).
        settle(db.url)
        if args.warmup:
            # Unmeasured: every server starts cold (pools that grow on demand, a new backend's first plans,
            # Python's first calls), and a cold start is not what a service that runs for days serves.
            wrk(workload, port, args, holds_file, duration=args.warmup)
        before, server_before = db.cpu_breakdown(), server_cpu_seconds(server)
        result = wrk(workload, port, args, holds_file)
        after, server_cpu = db.cpu_breakdown(), server_cpu_seconds(server) - server_before
        parts = {part: after[part] - before[part] for part in before}
        cpu = sum(parts.values())
        if holds_file is not None:
            holds_file.unlink()
        result["pg_cpu_us_per_op"] = round(cpu / result["acked"] * 1e6, 1) if result["acked"] else None
        # The Python side's cost per request: less noisy than req/s on a shared machine (same-run ratios only).
        result["server_cpu_us_per_op"] = round(server_cpu / result["acked"] * 1e6, 1) if result["acked"] else None
        # Only the client backends are this server's own doing; the rest is shared or deferred work.
        result["pg_cpu_us_per_op_parts"] = {
            part: round(seconds / result["acked"] * 1e6, 1) if result["acked"] else None
            for part, seconds in parts.items()
        }
        if workload in WRITES:
            # wrk stops counting at its deadline while up to one request per connection is in flight; those
            # commit. So: the acknowledged requests, plus at most one per connection.
            rows = ledger_rows(db.url, result["nonce"])
            result["ledger_rows"] = rows
            result["ledger_matches_acks"] = 0 <= rows - result["acked"] <= args.connections
        figures[workload] = result
        print(
            f"  {label:<10} {workload:<14} {result['rps']:>9} req/s  p99 {result['p99_ms']} ms"
            f"  non-2xx {result['non_2xx']}  server CPU µs/op {result['server_cpu_us_per_op']}"
            f"  PG CPU µs/op {result['pg_cpu_us_per_op']}"
            f" (backends {result['pg_cpu_us_per_op_parts']['backends']},"
            f" autovacuum {result['pg_cpu_us_per_op_parts']['autovacuum']},"
            f" shared {result['pg_cpu_us_per_op_parts']['shared']})",
            flush=True,
        )
    return figures


# ---------------------------------------------------------------------------------------------------------
# History (service only)


def history(port: int, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Download the 1M-row history whole, streaming; sample the server's total RSS meanwhile."""
    processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]

    def rss() -> int:
        return sum(p.memory_info().rss for p in processes if p.is_running())

    baseline, peak, sampling = rss(), [0], [True]

    def sample() -> None:
        while sampling[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    # Twice: the first history request a worker serves pays for cold code paths and a cold backend; the
    # second is the steady state. Both are reported.
    # One keep-alive client, so the second request reaches the worker the first one warmed.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        first, second = download(client), download(client)
    sampling[0] = False
    sampler.join()
    return {
        "ttfb_cold_ms": first["ttfb_ms"],
        "ttfb_ms": second["ttfb_ms"],
        "total_s": second["total_s"],
        "bytes": second["bytes"],
        "rss_growth_mb": round((peak[0] - baseline) / 2**20, 1),
    }


def download(client: httpx.Client) -> dict[str, Any]:
    started = time.perf_counter()
    first_byte = None
    size = 0
    with client.stream(
        "GET", f"/billing/transactions/{HISTORY_USER}", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        for chunk in response.iter_raw():
            if first_byte is None:
                first_byte = time.perf_counter() - started
            size += len(chunk)
    assert response.status_code == 200
    total = time.perf_counter() - started
    return {"ttfb_ms": round((first_byte or 0) * 1000, 1), "total_s": round(total, 2), "bytes": size}


# ---------------------------------------------------------------------------------------------------------


def run_server(
    db: Database,
    start: Callable[[], subprocess.Popen[bytes]],
    port: int,
    workloads: list[str],
    args: argparse.Namespace,
    label: str,
    with_history: bool = False,
) -> dict[str, Any]:
    process = start()
    try:
        figures = drive(db, port, workloads, args, label, process)
        if with_history:
            figures["history_1m"] = history(port, process)
    finally:
        stop(process)
    figures["audit_clean"] = audit(db.url)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts, e.g. 1,2,4")
    parser.add_argument("--duration", type=int, default=10, help="seconds per workload and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="passes over the servers, every other one in reverse order (ABBA); figures are combined",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of each workload run unmeasured before it is measured"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--database-url", default=None, help="a server to create a fresh database on")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the --database-url database")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"a subset of {','.join(WORKLOADS)}")
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument("--skip-pgbench", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--reference-server",
        choices=("granian", "uvicorn"),
        default="granian",
        help="the reference app's server (granian measured faster here; see docs/performance.md)",
    )
    parser.add_argument("--reference-driver", choices=("psycopg", "asyncpg"), default="psycopg")
    parser.add_argument(
        "--service-variant",
        action="append",
        default=[],
        metavar="NAME:ENV=VALUE[,ENV=VALUE]",
        help="after the service, run it again with these environment overrides (repeatable): an A/B in one run",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="instead of wrk: each app's own CPU per request, driven in-process (bench/inprocess.py), in rounds",
    )
    parser.add_argument(
        "--compare-reference",
        action="store_true",
        help="also run the reference app on granian and uvicorn, with psycopg and asyncpg, and compare",
    )
    args = parser.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk")

    started = time.monotonic()
    db = Database(args)
    try:
        if args.in_process:
            in_process(db, args)
            return
        results = bench(db, workloads, args)
    finally:
        db.close(args.keep_database)
    results["elapsed_s"] = round(time.monotonic() - started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\n{results['elapsed_s']} s in all; results in {RESULTS / 'latest.json'}")


def bench(db: Database, workloads: list[str], args: argparse.Namespace) -> dict[str, Any]:
    print(f"PostgreSQL {db.version} ({db.kind}); seeding 1,000 accounts and a 1,000,000-row history ...", flush=True)
    seed(db.url, args)
    results: dict[str, Any] = {
        "connections": args.connections,
        "duration_s": args.duration,
        "postgresql": {"version": db.version, "kind": db.kind},
        "service": {name: os.environ.get(f"BILLING_{name.upper()}") for name in BATCHERS},
        "reference": {"server": args.reference_server, "driver": args.reference_driver},
        "pgbench": {},
        "runs": [],
    }
    if not args.skip_pgbench:
        print("pgbench: the service's exact SQL, no HTTP, no Python ...", flush=True)
        if "capture" in workloads:
            create_holds(db.url, args, "pgbench hold")
        for workload in workloads:
            settle(db.url)
            results["pgbench"][workload] = figures = pgbench(db, workload, args)
            print(f"  pgbench    {workload:<14} {figures['tps']:>9} tps", flush=True)
        results["pgbench"]["audit_clean"] = audit(db.url)

    for workers in [int(w) for w in args.workers.split(",")]:
        # A port the OS says is free now, not a fixed one: with a fixed port, a second bench running on the
        # machine (another engineer's) made this one's wrk measure the other's server without noticing.
        port = free_port()
        servers: list[tuple[str, Callable[[], subprocess.Popen[bytes]]]] = [
            ("service", lambda: start_service(db.url, workers, port))  # noqa: B023 - called before the loop moves on
        ]
        for variant in args.service_variant:
            name, _, assignments = variant.partition(":")
            overrides = dict(item.split("=", 1) for item in assignments.split(",") if item)
            servers.append((name, lambda o=overrides: start_service(db.url, workers, port, o)))  # noqa: B023
        if not args.skip_reference:
            server, driver = args.reference_server, args.reference_driver
            servers.append(("reference", lambda: start_reference(db.url, workers, port, server, driver)))  # noqa: B023
        # Rounds in ABBA order: the servers run in turn, and every other round in reverse, so a trend in the
        # machine or the database (load from elsewhere, tables growing, autovacuum after the writes) falls on
        # every server alike instead of on whichever runs last. Each server's figures are then combined.
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in servers}
        for round_number in range(args.rounds):
            order = servers if round_number % 2 == 0 else servers[::-1]
            for name, start in order:
                print(f"round {round_number + 1}/{args.rounds}: {name} with {workers} worker(s) ...", flush=True)
                with_history = name == "service" and not passes["service"] and not args.skip_history
                passes[name].append(run_server(db, start, port, workloads, args, name, with_history=with_history))
        run: dict[str, Any] = {"workers": workers, "rounds": passes}
        for name, figures in passes.items():
            combined = combine(figures, workloads)
            if name in ("service", "reference"):
                run[name] = combined
            else:
                run.setdefault("service_variants", {})[name] = combined
        if args.compare_reference:
            run["reference_variants"] = compare_reference(db, workers, port, workloads, args)
        results["runs"].append(run)
    return results


def combine(passes: list[dict[str, Any]], workloads: list[str]) -> dict[str, Any]:
    """One server's rounds as one figure per workload: throughput and CPU per op averaged over the rounds,
    the worst p50 and p99, every non-2xx counted, and the ledger and audit checks held in every round."""
    combined: dict[str, Any] = {"audit_clean": all(figures["audit_clean"] for figures in passes)}
    if "history_1m" in passes[0]:
        combined["history_1m"] = passes[0]["history_1m"]
    for workload in workloads:
        rounds = [figures[workload] for figures in passes]

        def mean(key: str, rounds: list[dict[str, Any]] = rounds) -> float | None:
            values = [r[key] for r in rounds if r.get(key) is not None]
            return round(sum(values) / len(values), 1) if values else None

        figure: dict[str, Any] = {
            "rps": mean("rps"),
            "acked_rps": mean("acked_rps"),
            "rps_by_round": [r["acked_rps"] for r in rounds],
            "p50_ms": max(r["p50_ms"] for r in rounds),
            "p99_ms": max(r["p99_ms"] for r in rounds),
            "p99_ms_by_round": [r["p99_ms"] for r in rounds],
            "non_2xx": sum(r["non_2xx"] for r in rounds),
            "acked": sum(r["acked"] for r in rounds),
            "pg_cpu_us_per_op": mean("pg_cpu_us_per_op"),
            "server_cpu_us_per_op": mean("server_cpu_us_per_op"),
        }
        if workload in WRITES:
            figure["ledger_rows"] = sum(r["ledger_rows"] for r in rounds)
            figure["ledger_matches_acks"] = all(r["ledger_matches_acks"] for r in rounds)
        combined[workload] = figure
    return combined


IN_PROCESS_CASES = (
    ("balance", False, 16_000),
    ("balance", True, 64_000),  # the database call stubbed: what each app costs besides its driver
    ("charge", False, 8_000),
    ("capture", False, 4_000),  # each task on its own hold, as a streaming run captures
    ("capture", True, 32_000),
)


def in_process(db: Database, args: argparse.Namespace) -> None:
    """The Python layer alone (bench/inprocess.py), each app in a fresh interpreter, in ABBA rounds: CPU µs per
    request of the service and the reference app, side by side."""
    print(f"PostgreSQL {db.version} ({db.kind}); seeding ...", flush=True)
    seed(db.url, args)
    log_file("inprocess").close()  # started afresh; the runs append to it
    env = {**os.environ, "DATABASE_URL": db.url, "INPROCESS_LOG": str(LOGS / "inprocess.log")}
    figures: dict[tuple[str, str, bool], list[float]] = {}
    for round_number in range(args.rounds):
        apps = ("service", "reference") if round_number % 2 == 0 else ("reference", "service")
        for workload, stub, requests in IN_PROCESS_CASES:
            for app in apps:
                command = [sys.executable, str(HERE / "inprocess.py"), "--app", app, "--workload", workload]
                command += ["--requests", str(requests)] + (["--stub"] if stub else [])
                output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                assert result["non_200"] == 0, result
                figures.setdefault((workload, app, stub), []).append(result["cpu_us_per_request"])
                print(
                    f"  round {round_number + 1} {app:<10} {workload:<8}{' (stub)' if stub else '       '}"
                    f" {result['cpu_us_per_request']:>7} µs CPU per request",
                    flush=True,
                )
    print("\nin-process, CPU µs per request (mean of the rounds): service / reference (ratio)")
    for workload, stub, _ in IN_PROCESS_CASES:
        service = sum(figures[(workload, "service", stub)]) / args.rounds
        reference = sum(figures[(workload, "reference", stub)]) / args.rounds
        label = f"{workload}{', database call stubbed' if stub else ''}"
        print(f"  {label:<32} {service:7.1f} / {reference:7.1f}  ({service / reference:.2f}×)")


def compare_reference(
    db: Database, workers: int, port: int, workloads: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """The reference app on each server with each driver, on the read and write workloads."""
    variants: dict[str, Any] = {}
    chosen = [w for w in workloads if w != "charge_hot"]  # the hot row is PostgreSQL's limit, not Python's
    for server in ("granian", "uvicorn"):
        for driver in ("psycopg", "asyncpg"):
            label = f"{server}+{driver}"
            print(f"reference app ({label}) with {workers} worker(s) ...", flush=True)
            variants[label] = run_server(
                db,
                lambda: start_reference(db.url, workers, port, server, driver),  # noqa: B023
                port,
                chosen,
                args,
                label[:10],
            )
    return variants


# ---------------------------------------------------------------------------------------------------------
# The table


def _num(value: Any, width: int, digits: int | None = None) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if digits is not None:
        return f"{value:>{width}.{digits}f}"
    return f"{value:>{width}}"


def _ratio(numerator: dict[str, Any] | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return float(numerator.get("acked_rps", numerator["rps"])) / denominator


# The service's batchers, all on by default; each can be switched off through the environment (passed through).
BATCHERS = ("batch_charges", "batch_captures", "batch_reads")


def print_table(results: dict[str, Any]) -> None:
    pg, ref = results["postgresql"], results["reference"]
    batchers = ", ".join(f"BILLING_{name.upper()}={results['service'].get(name) or 'unset'}" for name in BATCHERS)
    print(
        f"\nPostgreSQL {pg['version']} ({pg['kind']}), fsync and synchronous_commit on; "
        f"{results['connections']} connections, {results['duration_s']} s per workload"
    )
    print(f"service: billing serve --workers N, default config (access log, metrics, auth); {batchers}")
    print(f"reference: bench/reference_app.py on {ref['server']} with {ref['driver']}, same worker count")
    print("pgbench: the same statements, -M prepared, no HTTP, no Python\n")
    header = (
        f"{'workload':<21}{'wk':>3} |{'service/s':>10}{'p50':>7}{'p99':>7}{'n2xx':>6} |"
        f"{'ref/s':>9}{'p50':>7}{'p99':>7}{'n2xx':>6} |{'pgbench/s':>10} |{'svc/ref':>8}{'svc/pgb':>8} |"
        f"{'svc/wk':>8} |{'PG CPU µs/op: svc':>18}{'ref':>6}{'pgb':>6}"
    )
    print(header)
    print("-" * len(header))
    pgbench = results["pgbench"]
    for run in results["runs"]:
        service, reference = run["service"], run.get("reference", {})
        for workload in WORKLOADS:
            if workload not in service:
                continue
            s, r, p = service[workload], reference.get(workload), pgbench.get(workload)
            tps = p["tps"] if p else None
            ref_acked = r.get("acked_rps", r["rps"]) if r else None
            print(
                f"{LABELS[workload]:<21}{run['workers']:>3} |{s['rps']:>10}{s['p50_ms']:>7.1f}{s['p99_ms']:>7.1f}"
                f"{s['non_2xx']:>6} |"
                + (
                    f"{r['rps']:>9}{r['p50_ms']:>7.1f}{r['p99_ms']:>7.1f}{r['non_2xx']:>6} |"
                    if r
                    else f"{'-':>9}{'-':>7}{'-':>7}{'-':>6} |"
                )
                + f"{_num(tps, 10)} |{_num(_ratio(s, ref_acked), 8, 2)}{_num(_ratio(s, tps), 8, 2)} |"
                f"{s['rps'] / run['workers']:>8.1f} |{_num(s['pg_cpu_us_per_op'], 18)}"
                f"{_num(r['pg_cpu_us_per_op'] if r else None, 6, 0)}{_num(p['pg_cpu_us_per_op'] if p else None, 6, 0)}"
            )
    print()
    for run in results["runs"]:
        print_checks(run, pgbench, results["connections"])
    if pgbench:
        print(f"pgbench: audit {'clean' if pgbench.get('audit_clean') else 'DRIFT'}")


def print_checks(run: dict[str, Any], pgbench: dict[str, Any], connections: int) -> None:
    workers = run["workers"]
    service = run["service"]
    if "history_1m" in service:
        h = service["history_1m"]
        print(
            f"history 1M rows, {workers} worker(s): first byte {h['ttfb_ms']} ms "
            f"(cold worker: {h['ttfb_cold_ms']} ms), total {h['total_s']} s, RSS growth {h['rss_growth_mb']} MB"
        )
    servers = {
        "service": service,
        **run.get("service_variants", {}),
        "reference": run.get("reference"),
        **run.get("reference_variants", {}),
    }
    for name, figures in servers.items():
        if not figures:
            continue
        writes = [
            f"{w} {figures[w]['ledger_rows']}/{figures[w]['acked']}"
            + ("" if figures[w]["ledger_matches_acks"] else " MISMATCH")
            for w in WRITES
            if w in figures
        ]
        print(
            f"{name}, {workers} worker(s): audit {'clean' if figures['audit_clean'] else 'DRIFT'}; "
            f"ledger rows/acked (≤ +{connections} in flight at wrk's deadline, per round): {', '.join(writes) or '-'}"
        )
    reference = run.get("reference") or {}
    by_round = [
        f"{w} "
        + " / ".join(
            f"{s / r:.2f}" for s, r in zip(service[w]["rps_by_round"], reference[w]["rps_by_round"], strict=True)
        )
        for w in WORKLOADS
        if w in service and w in reference and all(reference[w]["rps_by_round"])
    ]
    if by_round:
        print(f"service/reference by round, {workers} worker(s): " + "; ".join(by_round))
    for name, figures in run.get("service_variants", {}).items():
        cells = [
            f"{w} {figures[w]['acked_rps']} vs {service[w]['acked_rps']}"
            f" ({figures[w]['acked_rps'] / service[w]['acked_rps']:.2f}×)"
            for w in WORKLOADS
            if w in figures and service[w]["acked_rps"]
        ]
        print(f"variant {name} vs service, {workers} worker(s), acked req/s: " + "; ".join(cells))
    if run.get("reference_variants"):
        print(f"\nreference app variants, {workers} worker(s): req/s (p99 ms)")
        for name, figures in run["reference_variants"].items():
            cells = [f"{w} {figures[w]['rps']} ({figures[w]['p99_ms']})" for w in WORKLOADS if w in figures]
            print(f"  {name:<18}" + "; ".join(cells))
    verdicts = []
    for workload, figure, baseline, bound in TARGETS:
        if workload not in service:
            continue
        value = service[workload][figure]
        if baseline is None:
            verdicts.append(f"{workload} p99 {value} ≤ {bound:g} ms {'ok' if value <= bound else 'MISS'}")
            continue
        if baseline.startswith("service:"):  # the service against itself on another workload
            base = service.get(baseline.removeprefix("service:"))
        elif baseline == "reference":
            base = (run.get("reference") or {}).get(workload)
        else:
            base = pgbench.get(workload)
        if not base:
            continue
        denominator = base["tps"] if baseline == "pgbench" else base.get("acked_rps", base["rps"])
        if not denominator:
            verdicts.append(f"{workload}: no {baseline} figure")
            continue
        ratio = value / denominator
        verdicts.append(f"{workload} {ratio:.2f}× {baseline} ≥ {bound:g} {'ok' if ratio >= bound else 'MISS'}")
    print(f"targets, {workers} worker(s): " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
