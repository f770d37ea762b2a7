"""The side-by-side benchmark: the service under wrk, and PostgreSQL's own limit under pgbench, in one run.

    ./scripts/bench [--workers 1,2,4] [--duration 15] [--connections 32] [--database-url URL]

It starts PostgreSQL (embedded, or a fresh database on --database-url), migrates, seeds 1,000 accounts,
then for each worker count starts `billing serve --workers N` and drives it with wrk (a C load generator:
Python would eat the CPU it measures). pgbench runs the service's exact charge and balance SQL (from
billing_service.ledger.sql) at the same concurrency. Results go to bench/results/latest.json and a table.
synchronous_commit and fsync stay on: every acknowledged charge is on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import psycopg

from billing_service.ledger import sql

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOKEN = "bench-service-token"  # noqa: S105 - the throwaway server the bench starts and stops
ACCOUNTS = 1000
HOT_USER = "00000000-0000-4000-8000-000000000001"
HISTORY_USER = "00000000-0000-4000-9000-000000000001"
HISTORY_ROWS = 1_000_000


def user_sql_expr(variable: str) -> str:
    """The SQL expression pgbench uses for a seeded user id, from its integer variable."""
    return f"('00000000-0000-4000-8000-' || lpad(:{variable}::text, 12, '0'))::uuid"


def database(args: argparse.Namespace) -> tuple[str, str, Any]:
    """(url, pgbench binary, handle to keep alive)."""
    if args.database_url:
        name = f"billing_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(args.database_url)._replace(path=f"/{name}"))
        return url, shutil.which("pgbench") or "pgbench", None
    import pgserver
    from pgserver._commands import POSTGRES_BIN_PATH

    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="billing-bench-pg-")), cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE billing_bench")
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit')"
            ).fetchall()
        )
    assert settings == {"fsync": "on", "synchronous_commit": "on"}, settings
    return server.get_uri("billing_bench"), str(POSTGRES_BIN_PATH / "pgbench"), server


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
]


def seed(url: str) -> None:
    """1,000 funded accounts, and one user with a 1,000,000-row history, each with a consistent chain."""
    subprocess.run(
        [sys.executable, "-m", "billing_service", "migrate"], env={**os.environ, "DATABASE_URL": url}, check=True
    )
    params = {"accounts": ACCOUNTS, "history_user": HISTORY_USER, "rows": HISTORY_ROWS}
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SEED:
            conn.execute(statement, params)
        conn.execute("VACUUM ANALYZE")


def start_service(url: str, workers: int, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "BILLING_SERVICE_TOKENS": TOKEN, "BILLING_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "billing_service", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the service did not become ready")


def stop_service(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def wrk(script: str, port: int, args: argparse.Namespace, mode: str = "spread") -> dict[str, Any]:
    nonce = uuid.uuid4().hex[:8]
    command = [
        "wrk",
        "-t",
        "2",
        "-c",
        str(args.connections),
        "-d",
        f"{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "wrk" / script),
        f"http://127.0.0.1:{port}",
        "--",
        TOKEN,
        mode,
        nonce,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    seconds = result["duration_us"] / 1e6
    return {
        "rps": round(result["requests"] / seconds, 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "non_2xx": result["non_2xx"] + result["socket_errors"],
        "requests": result["requests"],
    }


def pgbench_script(statement: str, hot: bool) -> str:
    """The service's statement, verbatim, with pgbench variables in place of its bound parameters."""
    params = {
        "user_id": "1" if hot else None,
        "amount": "1",
        "description": "'pgbench charge'",
        "metadata": "NULL::jsonb",
        "idempotency_key": "'pgb-' || :client_id || '-' || :key",
        "request_hash": "'\\x00'::bytea",
    }
    text = statement
    for name, value in params.items():
        replacement = user_sql_expr("n") if name == "user_id" and value is None else value
        if name == "user_id" and hot:
            replacement = f"'{HOT_USER}'::uuid"
        text = text.replace(f"%({name})s", f"({replacement})")
    assert "%(" not in text, re.findall(r"%\(\w+\)s", text)
    # pgbench reads one statement per line: join the lines, dropping SQL comments first.
    lines = (re.sub(r"--.*$", "", line).strip() for line in text.strip().splitlines())
    one_line = " ".join(line for line in lines if line)
    return f"\\set n random(1, {ACCOUNTS})\n\\set key random(1, 9000000000000000000)\n{one_line};\n"


def pgbench(binary: str, url: str, statement: str, args: argparse.Namespace, hot: bool = False) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(pgbench_script(statement, hot))
    command = [
        binary,
        "-n",
        "-M",
        "prepared",
        "-c",
        str(args.connections),
        "-j",
        "2",
        "-T",
        str(args.duration),
        "-P",
        "0",
        "--log-prefix",
        "x",
        "-r",
        "-f",
        script.name,
        url,
    ]
    output = subprocess.run(
        [c for c in command if c not in ("-P", "0", "--log-prefix", "x")], capture_output=True, text=True, check=True
    ).stdout
    tps = float(re.search(r"tps = ([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latency = float(re.search(r"latency average = ([\d.]+) ms", output).group(1))  # type: ignore[union-attr]
    failed = (
        int(re.search(r"number of failed transactions: (\d+)", output).group(1))
        if "failed transactions" in output
        else 0
    )  # type: ignore[union-attr]
    return {"tps": round(tps, 1), "avg_ms": latency, "failed": failed}


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


def audit_and_count(url: str) -> tuple[bool, int]:
    result = subprocess.run(
        [sys.executable, "-m", "billing_service", "audit"],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
    )
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM transactions WHERE description = 'bench charge'").fetchone()
    return result.returncode == 0, int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts, e.g. 1,2,4")
    parser.add_argument("--duration", type=int, default=15, help="seconds per workload")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--database-url", default=None, help="a server to create a fresh database on")
    parser.add_argument("--skip-history", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk")

    url, pgbench_binary, _server = database(args)
    print("seeding 1,000 accounts and a 1,000,000-row history ...", flush=True)
    seed(url)
    ledger_rows = 0
    results: dict[str, Any] = {"connections": args.connections, "duration_s": args.duration, "runs": []}

    print("pgbench: the service's exact SQL, no HTTP, no Python ...", flush=True)
    limit = {
        "charge_spread": pgbench(pgbench_binary, url, sql.CHARGE, args),
        "charge_hot": pgbench(pgbench_binary, url, sql.CHARGE, args, hot=True),
        "balance": pgbench(pgbench_binary, url, sql.BALANCE, args),
    }
    results["pgbench"] = limit

    for workers in [int(w) for w in args.workers.split(",")]:
        port = 18000 + workers
        server = start_service(url, workers, port)
        try:
            print(f"service with {workers} worker(s) ...", flush=True)
            run: dict[str, Any] = {"workers": workers}
            acked = 0
            run["charge_spread"] = wrk("charge.lua", port, args, "spread")
            run["charge_hot"] = wrk("charge.lua", port, args, "hot")
            acked += run["charge_spread"]["requests"] - run["charge_spread"]["non_2xx"]
            acked += run["charge_hot"]["requests"] - run["charge_hot"]["non_2xx"]
            run["balance"] = wrk("balance.lua", port, args, "spread")
            if not args.skip_history:
                run["history_1m"] = history(port, server)
        finally:
            stop_service(server)
        clean, rows = audit_and_count(url)
        # wrk stops counting at the deadline; requests then in flight may still commit, at most one per connection.
        run["audit_clean"] = clean
        run["acked_charges"] = acked
        run["ledger_charges_added"], ledger_rows = rows - ledger_rows, rows
        # Exactly the acknowledged charges, plus at most one in flight per connection per charge workload
        # when wrk's clock ran out (those committed, but wrk stopped counting).
        in_flight = run["ledger_charges_added"] - acked
        run["ledger_matches_acks"] = 0 <= in_flight <= 2 * args.connections
        results["runs"].append(run)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    limit = results["pgbench"]
    print(f"\n{results['connections']} connections, {results['duration_s']} s per workload\n")
    header = (
        f"{'workload':<22}{'workers':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
        f"{'pgbench/s':>11}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for run in results["runs"]:
        for name in ("charge_spread", "charge_hot", "balance"):
            figures, base = run[name], limit[name]["tps"]
            print(
                f"{name:<22}{run['workers']:>8}{figures['rps']:>10}{figures['p50_ms']:>9}{figures['p99_ms']:>9}"
                f"{figures['non_2xx']:>9}{base:>11}{figures['rps'] / base:>8.2f}"
            )
        if "history_1m" in run:
            h = run["history_1m"]
            print(
                f"{'history 1M rows':<22}{run['workers']:>8}  first byte {h['ttfb_ms']} ms (cold worker: "
                f"{h['ttfb_cold_ms']} ms), total {h['total_s']} s, "
                f"RSS growth {h['rss_growth_mb']} MB"
            )
        print(
            f"{'audit':<22}{run['workers']:>8}  {'clean' if run['audit_clean'] else 'DRIFT'}; "
            f"acked charges {run['acked_charges']}, ledger rows added {run['ledger_charges_added']} "
            f"({'consistent' if run['ledger_matches_acks'] else 'MISMATCH'})"
        )


if __name__ == "__main__":
    main()
