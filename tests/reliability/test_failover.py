"""Primary failover with a synchronous standby: no acknowledged write is ever lost.

The suite brings up its own pair with `scripts/pg-sync-pair` (so the operators' script is tested too): a
primary and a standby it replicates to synchronously, on free ports in a temp dir, and one `billing serve
--workers 2` whose DATABASE_URL lists both hosts with target_session_attrs=read-write. The tests run in file
order on that one pair:

1. standby stopped: the primary cannot replicate, so no write may be acknowledged. Phase A lets each commit
   hit the service's own bound on the wait (BILLING_REPLICATION_WAIT_MS); phase B also cancels every waiting
   commit from outside (pg_cancel_backend, as an operator or a pool reset would), which makes PostgreSQL
   commit locally and answer success with only a WARNING. Zero 2xx for writes; then the standby returns and
   every key retried gets its one transaction.
2. the throughput of synchronous vs asynchronous replication (figures only).
3. failover: clients write through the SDK; the primary's postmaster is killed with -9 mid-load and the
   standby promoted; the SDK retries with the same keys; every acknowledged write is on the new primary
   exactly once, balances equal the acknowledged sums, and `billing audit` (given the multi-host URL) is clean.

Figures are printed (run with -s) and recorded in docs/reliability.md; none is asserted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from billing_client import AsyncBillingClient, InsufficientBalance, RetryPolicy, ServiceUnavailable
from conftest import SERVICE_TOKEN, LiveServer, free_port, start_server, stop_server

from .helpers import ClientLog, ledger_violations, merge, model_violations, run_audit

pytestmark = pytest.mark.slow

PAIR_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pg-sync-pair"
DATABASE = "billing_failover"
CLIENTS = 8
ACCOUNTS = 12
STATEMENT_TIMEOUT_MS = 1000
REPLICATION_WAIT_MS = 1000
SDK_RETRY = RetryPolicy(attempts=40, timeout=90.0, wait_initial=0.1, wait_max=1.0, wait_jitter=0.2)


class SyncPair:
    """`scripts/pg-sync-pair` on a directory of its own."""

    def __init__(self) -> None:
        # Short, and under /tmp: the sockets live here, and the servers' user must reach it when run as root.
        self.dir = Path(tempfile.mkdtemp(prefix="pair-", dir="/tmp"))
        self.primary_port, self.standby_port = free_port(), free_port()

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [str(PAIR_SCRIPT), str(self.dir), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"pg-sync-pair {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout.strip()

    def node_url(self, port: int, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    @property
    def service_url(self) -> str:
        base = self.run("url")
        assert base.endswith("/postgres?target_session_attrs=read-write"), base
        return base.replace("/postgres?", f"/{DATABASE}?")

    def cleanup(self) -> None:
        subprocess.run([str(PAIR_SCRIPT), str(self.dir), "stop"], capture_output=True, timeout=60, check=False)
        # The crashed primary's orphaned backends exit on their own; its directory goes regardless.
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[SyncPair]:
    if not (shutil.which("pg_config") or Path("/usr/lib/postgresql/15/bin/initdb").exists()):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_basebackup) on this machine")
    pair = SyncPair()
    try:
        started = time.monotonic()
        pair.run("start", str(pair.primary_port), str(pair.standby_port))
        print(f"\npg-sync-pair start: {time.monotonic() - started:.1f} s\n{pair.run('status')}")
        with psycopg.connect(pair.node_url(pair.primary_port), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture(scope="module")
def failover_server(pair: SyncPair) -> Iterator[LiveServer]:
    live = start_server(
        pair.service_url,
        workers=2,
        BILLING_STATEMENT_TIMEOUT_MS=str(STATEMENT_TIMEOUT_MS),
        BILLING_REPLICATION_WAIT_MS=str(REPLICATION_WAIT_MS),
    )
    yield live
    stop_server(live.process)


def sdk(server: LiveServer, statuses: list[tuple[int, str | None]] | None = None) -> AsyncBillingClient:
    """The SDK as an orchestrator uses it; `statuses` collects every attempt's (status, error code)."""

    async def record(response: httpx.Response) -> None:
        if statuses is not None and response.request.method == "POST":
            code = None
            if response.status_code >= 400:
                await response.aread()
                code = response.json().get("code")
            statuses.append((response.status_code, code))

    http = httpx.AsyncClient(timeout=15, event_hooks={"response": [record]})
    return AsyncBillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=SDK_RETRY, http_client=http)


async def fund(server: LiveServer, accounts: list[str], amount: int) -> ClientLog:
    log = ClientLog()
    async with sdk(server) as billing:
        for user_id in accounts:
            key = str(uuid.uuid4())
            posted = await billing.credit(user_id, amount, "funding", idempotency_key=key)
            log.record(key, "credit", user_id, amount, posted_body(posted))
    return log


def posted_body(posted: Any) -> dict[str, Any]:
    return {"transaction_id": str(posted.transaction_id), "balance": posted.balance}


# ------------------------------------------------------------------------------------------------------------
# 1. The standby is gone: the primary must not acknowledge.


@dataclass
class Sent:
    key: str
    kind: str
    user_id: str
    amount: int
    status: int | None = None  # None: no answer within the client's timeout
    code: str | None = None


def cancel_sync_waits(url: str, stop: threading.Event, cancelled: list[int]) -> None:
    """What an operator's pg_cancel_backend, a pool reset or a vanished client does to a waiting commit."""
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
            ).fetchall()
            cancelled.append(len(rows))
            stop.wait(0.2)


async def unreplicated_writer(
    http: httpx.AsyncClient, accounts: list[str], index: int, until: float, sent: list[Sent]
) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        kind = "credit" if n % 3 == 0 else "charge"
        item = Sent(str(uuid.uuid4()), kind, accounts[(index + n) % len(accounts)], 1 + n % 5)
        body = {"user_id": item.user_id, "amount": item.amount, "description": "standby down"}
        try:
            response = await http.post(f"/billing/{kind}-tokens", json=body, headers={"Idempotency-Key": item.key})
            item.status = response.status_code
            item.code = response.json().get("code") if response.status_code >= 400 else None
        except httpx.TimeoutException:
            pass
        sent.append(item)


async def standby_down_phase(server: LiveServer, accounts: list[str], seconds: float) -> list[Sent]:
    sent: list[Sent] = []
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=15) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(*(unreplicated_writer(http, accounts, i, until, sent) for i in range(CLIENTS)))
    return sent


def test_without_its_standby_the_primary_acknowledges_no_write(failover_server, pair):
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    funding = asyncio.run(fund(failover_server, accounts, 1_000))
    pair.run("stop-standby")

    started = time.monotonic()
    phase_a = asyncio.run(standby_down_phase(failover_server, accounts, 4))
    stop, cancelled = threading.Event(), []
    canceller = threading.Thread(
        target=cancel_sync_waits, args=(pair.node_url(pair.primary_port, DATABASE), stop, cancelled)
    )
    canceller.start()
    try:
        phase_b = asyncio.run(standby_down_phase(failover_server, accounts, 4))
    finally:
        stop.set()
        canceller.join()
    with httpx.Client(base_url=failover_server.base_url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as c:
        reads = [c.get(f"/billing/balance/{user_id}").status_code for user_id in accounts[:4]]
    outage = time.monotonic() - started

    # Which of the refused writes are nonetheless in the primary's ledger: committed locally, never acknowledged.
    sent = phase_a + phase_b
    with psycopg.connect(pair.node_url(pair.primary_port, DATABASE), autocommit=True) as conn:
        local = {
            row[0] for row in conn.execute("SELECT idempotency_key FROM transactions WHERE idempotency_key IS NOT NULL")
        }
    pair.run("start-standby")
    pair.run("sync")

    def tally(items: list[Sent]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in items:
            label = f"{item.status} {item.code}" if item.status else "no answer"
            counts[label] = counts.get(label, 0) + 1
        return counts

    committed_locally = [item for item in sent if item.key in local]
    print(
        f"\nstandby down {outage:.1f} s: phase A (service's bound on the wait) {tally(phase_a)};"
        f" phase B (+ pg_cancel_backend of waiting commits, {sum(cancelled)} cancelled) {tally(phase_b)};"
        f" {len(committed_locally)} of {len(sent)} refused writes had committed locally"
        f" ({tally(committed_locally)}); balance reads meanwhile: {reads}"
    )
    acked = [item for item in sent if item.status is not None and 200 <= item.status < 300]
    assert not acked, f"{len(acked)} writes acknowledged without the standby: {acked[:5]}"
    unexpected = [item for item in sent if item.status not in (None, 402, 503)]
    assert not unexpected, unexpected[:5]
    assert any(item.code == "commit_not_replicated" for item in phase_a), "phase A never hit the trap"
    assert sum(cancelled) > 0 and any(item.code == "commit_not_replicated" for item in phase_b)

    # The standby is back: the SDK retries each key with its body and gets its one transaction (a replay of
    # the locally committed row, now replicated, or a fresh post).
    async def resolve() -> ClientLog:
        log = ClientLog()
        async with sdk(failover_server) as billing:
            for item in sent:
                write = billing.charge if item.kind == "charge" else billing.credit
                try:
                    posted = await write(item.user_id, item.amount, "standby down", idempotency_key=item.key)
                except InsufficientBalance:
                    log.refused.add(item.key)
                    continue
                if posted.replayed:
                    log.replays += 1
                log.record(item.key, item.kind, item.user_id, item.amount, posted_body(posted))
        return log

    resolved = asyncio.run(resolve())
    print(f"after the standby returned: {len(resolved.acked)} retried keys posted once ({resolved.replays} replays)")
    log = merge([funding, resolved])
    assert not log.violations, log.violations[:5]
    assert model_violations(failover_server.database_url, log, accounts) == []
    assert ledger_violations(pair.node_url(pair.primary_port, DATABASE)) == []


# ------------------------------------------------------------------------------------------------------------
# 2 and 3. Load through the SDK: throughput, then a failover.


@dataclass
class Load:
    accounts: list[str]
    stop_at: float = float("inf")
    calls: list[tuple[float, float, str, bool]] = field(default_factory=list)  # sent, done, kind, acked
    statuses: list[tuple[int, str | None]] = field(default_factory=list)
    gave_up: list[tuple[str, str, str, int]] = field(default_factory=list)  # key, kind, user, amount


async def sdk_writer(server: LiveServer, load: Load, index: int) -> ClientLog:
    log = ClientLog()
    n = 0
    async with sdk(server, load.statuses) as billing:
        while time.monotonic() < load.stop_at:
            n += 1
            kind = "credit" if n % 4 == 0 else "charge"
            user_id, amount, key = load.accounts[(index * 7 + n) % len(load.accounts)], 1 + n % 9, str(uuid.uuid4())
            write = billing.charge if kind == "charge" else billing.credit
            sent = time.monotonic()
            log.requests += 1
            try:
                posted = await write(user_id, amount, "failover", idempotency_key=key)
            except InsufficientBalance:
                log.refused.add(key)
                load.calls.append((sent, time.monotonic(), kind, False))
                continue
            except ServiceUnavailable:
                load.gave_up.append((key, kind, user_id, amount))
                load.calls.append((sent, time.monotonic(), kind, False))
                continue
            load.calls.append((sent, time.monotonic(), kind, True))
            if posted.replayed:
                log.replays += 1
            log.record(key, kind, user_id, amount, posted_body(posted))
    return log


async def run_load(server: LiveServer, load: Load, seconds: float) -> ClientLog:
    load.stop_at = time.monotonic() + seconds
    return merge(list(await asyncio.gather(*(sdk_writer(server, load, i) for i in range(CLIENTS)))))


def test_throughput_of_synchronous_and_asynchronous_replication(failover_server, pair):
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    asyncio.run(fund(failover_server, accounts, 1_000_000))
    figures = {}
    for mode in ("sync", "async"):
        pair.run(mode)
        seconds = 4.0
        log = asyncio.run(run_load(failover_server, Load(accounts), seconds))
        assert not log.violations
        figures[mode] = len(log.acked) / seconds
    pair.run("sync")
    print(
        f"\nwrites/s through billing serve --workers 2, {CLIENTS} SDK clients: synchronous standby"
        f" {figures['sync']:.0f}, asynchronous {figures['async']:.0f}"
    )


def test_failover_to_the_synchronous_standby_loses_no_acknowledged_write(failover_server, pair):
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    funding = asyncio.run(fund(failover_server, accounts, 5_000))
    load = Load(accounts)
    marks: dict[str, float] = {}

    async def scenario() -> ClientLog:
        writers = asyncio.create_task(run_load(failover_server, load, 14))
        await asyncio.sleep(4)
        await asyncio.to_thread(pair.run, "crash-primary")
        marks["kill"] = time.monotonic()
        await asyncio.sleep(1)  # an operator (or pg_auto_failover / Patroni) deciding
        await asyncio.to_thread(pair.run, "promote")
        marks["promote"] = time.monotonic()
        return await writers

    log = asyncio.run(scenario())

    # A call the SDK gave up on is retried with its key until it resolves: that is what its caller would do.
    async def resolve_gave_up() -> ClientLog:
        resolved = ClientLog()
        async with sdk(failover_server) as billing:
            for key, kind, user_id, amount in load.gave_up:
                write = billing.charge if kind == "charge" else billing.credit
                try:
                    posted = await write(user_id, amount, "failover", idempotency_key=key)
                except InsufficientBalance:
                    resolved.refused.add(key)
                    continue
                resolved.record(key, kind, user_id, amount, posted_body(posted))
        return resolved

    log = merge([funding, log, asyncio.run(resolve_gave_up())])
    kill = marks["kill"]
    after = sorted(done for sent, done, _, acked in load.calls if acked and sent > kill)
    first_success = after[0] - kill if after else float("inf")
    first_after_promote = min((done for done in after if done > marks["promote"]), default=float("inf"))
    spanning = [c for c in load.calls if c[0] < kill < c[1]]
    codes: dict[str, int] = {}
    for status, code in load.statuses:
        if status >= 500:
            codes[f"{status} {code}"] = codes.get(f"{status} {code}", 0) + 1

    new_primary = pair.node_url(pair.standby_port, DATABASE)
    with psycopg.connect(new_primary, autocommit=True) as conn:
        in_ledger = conn.execute(
            "SELECT count(*) FROM transactions WHERE user_id = ANY(%s::uuid[])", (accounts,)
        ).fetchone()
    model = model_violations(new_primary, log, accounts)
    lost = [v for v in model if "in the ledger 0 times" in v]
    doubled = [v for v in model if "times" in v and "0 times" not in v]
    print(
        f"\nfailover: {log.requests} SDK calls, {len(log.acked)} acknowledged writes (with the funding;"
        f" {in_ledger[0] if in_ledger else 0} rows on the new primary); {len(spanning)} calls in flight at the kill,"
        f" {len(load.gave_up)} given up by the SDK and retried; 5xx answers on the way {codes};"
        f" acknowledged writes lost {len(lost)}, double {len(doubled)};"
        f" first success {first_success:.2f} s after the kill (promotion at"
        f" {marks['promote'] - kill:.2f} s, first success {first_after_promote - marks['promote']:.2f} s after it)"
    )
    assert not log.violations, log.violations[:5]
    assert model == [], model[:10]
    assert ledger_violations(new_primary) == []
    audit = run_audit(pair.service_url)  # `billing audit` with the multi-host URL, as the service has it
    assert audit.returncode == 0, audit.stdout + audit.stderr
    with httpx.Client(base_url=failover_server.base_url) as c:
        assert c.get("/readyz").status_code == 200
    assert os.path.exists(pair.dir / "standby" / "postmaster.pid")
