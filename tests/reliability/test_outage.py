"""Database outage: PostgreSQL dies (immediate shutdown) under load and comes back.

While it is down every request gets a fast 503 database_unavailable with Retry-After (never a 500, never a
hang) and /readyz says 503. Once it is back the service recovers by itself within 5 s, and nothing that was
acknowledged is lost. The PostgreSQL here is the test's own (pgserver in a temp dir), never a shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest

from conftest import SERVICE_TOKEN, LiveServer, start_server, stop_server, with_database

from .helpers import ClientLog, ledger_violations, merge, model_violations, run_audit

pytestmark = pytest.mark.slow

CLIENTS = 12
ACCOUNTS = 20
OUTAGE_SECONDS = 8
RECOVERY_BOUND = 5.0
FAST_503 = 1.5  # seconds; generous for a loaded 2-core machine, well under the pool timeout
POOL_TIMEOUT = 3.0  # the service's default BILLING_POOL_TIMEOUT: the longest a request may wait for a connection


class OwnPostgres:
    """A PostgreSQL this test may kill: pgserver's binaries and data directory, started and stopped by pg_ctl."""

    def __init__(self) -> None:
        import pgserver

        self.pgdata = Path(tempfile.mkdtemp(prefix="billing-outage-pg-"))
        self.server = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()
        self.socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        self.user = "pgserver" if os.geteuid() == 0 else None

    def pg_ctl(self, *args: str) -> None:
        from pgserver import _commands

        _commands.pg_ctl(list(args), pgdata=self.pgdata, user=self.user, timeout=60)

    def stop_immediately(self) -> None:
        self.pg_ctl("-w", "-m", "immediate", "stop")

    def start(self) -> None:
        log = str(self.pgdata / "restart.log")
        self.pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start")

    def cleanup(self) -> None:
        # Already stopped when a test failed mid-outage: then there is nothing to stop, only files to remove.
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.pgdata, ignore_errors=True)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    postgres = OwnPostgres()
    yield postgres
    postgres.cleanup()


@pytest.fixture(scope="module")
def outage_server(own_postgres: OwnPostgres) -> Iterator[LiveServer]:
    with psycopg.connect(own_postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE billing_outage")
    live = start_server(with_database(own_postgres.url, "billing_outage"), workers=2)
    yield live
    stop_server(live.process)


@dataclass
class Answer:
    sent: float
    received: float
    status: int | None  # None: no HTTP answer at all
    code: str | None
    retry_after: str | None


@dataclass
class Timeline:
    down_at: float = float("inf")
    restarting_at: float = float("inf")  # PostgreSQL may serve before `pg_ctl start -w` returns
    up_at: float = float("inf")
    answers: list[Answer] = field(default_factory=list)
    stop: bool = False

    def while_down(self) -> list[Answer]:
        # Sent and answered strictly inside the outage (the in-flight ones at its edges may go either way).
        return [a for a in self.answers if self.down_at + 0.5 < a.sent and a.received < self.restarting_at]

    def after_restart(self) -> list[Answer]:
        return [a for a in self.answers if a.sent > self.up_at]


async def outage_client(http: httpx.AsyncClient, accounts: list[str], seed: int, timeline: Timeline) -> ClientLog:
    """Writes until told to stop; every request that got no definitive answer is retried with its key."""
    rng = random.Random(seed)
    log = ClientLog()
    while not timeline.stop:
        kind = rng.choice(["charge", "charge", "credit"])
        key = str(uuid.uuid4())
        body = {"user_id": rng.choice(accounts), "amount": rng.randint(1, 20), "description": "outage"}
        while True:
            sent = time.monotonic()
            log.requests += 1
            try:
                response = await http.post(f"/billing/{kind}-tokens", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                timeline.answers.append(Answer(sent, time.monotonic(), None, None, None))
                await asyncio.sleep(0.2)
                continue
            code = response.json().get("code") if response.status_code >= 400 else None
            answer = Answer(sent, time.monotonic(), response.status_code, code, response.headers.get("Retry-After"))
            timeline.answers.append(answer)
            if response.status_code == 200:
                log.record(key, kind, body["user_id"], body["amount"], response.json())
                break
            if response.status_code == 402 and code == "insufficient_balance":
                log.refused.add(key)
                break
            if response.status_code in (503, 409):
                await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 0.3))
                continue
            log.violations.append(f"{kind} {key}: {response.status_code} {response.text}")
            break
    return log


async def readiness_probe(base_url: str, timeline: Timeline) -> list[tuple[float, int]]:
    seen = []
    while not timeline.stop:
        # A new connection each time, so both workers get asked.
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as probe:
            try:
                seen.append((time.monotonic(), (await probe.get("/readyz")).status_code))
            except httpx.TransportError:
                seen.append((time.monotonic(), 0))
        await asyncio.sleep(0.1)
    return seen


async def run_outage(server: LiveServer, postgres: OwnPostgres) -> dict[str, Any]:
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    timeline = Timeline()
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30) as http:
        funding = ClientLog()
        for user_id in accounts:
            key = str(uuid.uuid4())
            response = await http.post(
                "/billing/credit-tokens",
                json={"user_id": user_id, "amount": 500, "description": "funding"},
                headers={"Idempotency-Key": key},
            )
            assert response.status_code == 200, response.text
            funding.record(key, "credit", user_id, 500, response.json())
        clients = [asyncio.create_task(outage_client(http, accounts, seed, timeline)) for seed in range(CLIENTS)]
        probe = asyncio.create_task(readiness_probe(server.base_url, timeline))
        await asyncio.sleep(3)
        await asyncio.to_thread(postgres.stop_immediately)
        timeline.down_at = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)
        timeline.restarting_at = time.monotonic()
        await asyncio.to_thread(postgres.start)
        timeline.up_at = time.monotonic()
        await asyncio.sleep(RECOVERY_BOUND + 3)
        timeline.stop = True
        logs = await asyncio.gather(*clients)
        readiness = await probe
    return {"log": merge([funding, *logs]), "accounts": accounts, "timeline": timeline, "readiness": readiness}


def test_database_outage_gives_fast_503s_and_recovers_without_losing_anything(outage_server, own_postgres):
    result = asyncio.run(run_outage(outage_server, own_postgres))
    log: ClientLog = result["log"]
    timeline: Timeline = result["timeline"]
    down, after = timeline.while_down(), timeline.after_restart()

    failures_after_restart = [a for a in after if a.status != 200 and a.code != "insufficient_balance"]
    recovered_in = max((a.received - timeline.up_at for a in failures_after_restart), default=0.0)
    not_ready = [t - timeline.up_at for t, status in result["readiness"] if t > timeline.up_at and status != 200]
    ready_in = max(not_ready, default=0.0)
    slowest_down = max((a.received - a.sent for a in down), default=0.0)
    print(
        f"\noutage: {log.requests} requests, {len(down)} answered during the {OUTAGE_SECONDS} s outage"
        f" (slowest {slowest_down:.2f} s); writes recovered {recovered_in:.2f} s and /readyz"
        f" {ready_in:.2f} s after PostgreSQL came back; {len(log.acked)} acknowledged writes;"
        f" {len(log.violations)} client violations"
    )
    assert len(down) > 2 * CLIENTS, "too few requests during the outage to show anything"
    wrong = [a for a in down if (a.status, a.code) != (503, "database_unavailable") or a.retry_after is None]
    assert not wrong, wrong[:5]
    # Bounded: at most the pool's wait for a connection, plus slack for a loaded machine. And fast: once the
    # pool knows the database is gone, requests do not wait out that timeout (most answer well under 1 s).
    assert slowest_down < POOL_TIMEOUT + 2.0
    latencies = sorted(a.received - a.sent for a in down)
    assert latencies[int(len(latencies) * 0.9)] < FAST_503, (
        f"503s are slow: p90 {latencies[int(len(latencies) * 0.9)]:.2f} s"
    )
    down_readiness = [s for t, s in result["readiness"] if timeline.down_at + 0.5 < t < timeline.restarting_at]
    assert down_readiness and set(down_readiness) == {503}, down_readiness
    assert recovered_in < RECOVERY_BOUND, f"writes still failing {recovered_in:.2f} s after the database came back"
    assert ready_in < RECOVERY_BOUND, f"/readyz still failing {ready_in:.2f} s after the database came back"
    assert [a for a in after if a.sent > timeline.up_at + RECOVERY_BOUND and a.status == 200]
    assert not log.violations, log.violations[:5]

    database_url = outage_server.database_url
    assert ledger_violations(database_url) == []
    assert model_violations(database_url, log, result["accounts"]) == []
    audit = run_audit(database_url)
    assert audit.returncode == 0, audit.stdout + audit.stderr
