"""Crash test: kill -9 a worker, then the whole server, several times, under load; restart; retry.

Clients charge, credit (half of the credits are grants, most expiring during the run), refund their own
acknowledged charges, and stream captures into holds of their own (as agent runs do; the capture batcher takes
them). They retry every request that got no answer with the same Idempotency-Key, until it gets one. Every
acknowledged write must be in the ledger exactly once, every retried request must resolve to exactly one
transaction or to none, and the bank invariants must hold. uvicorn (0.54) respawns a worker killed with
SIGKILL; the test checks that too, since the service's capacity depends on it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psutil
import pytest

from conftest import SERVICE_TOKEN, LiveServer, start_server, stop_server

from .helpers import (
    ClientLog,
    kill_process_group,
    ledger_violations,
    merge,
    model_violations,
    run_audit,
    wait_for,
    worker_processes,
)

pytestmark = pytest.mark.slow

CLIENTS = 16
ACCOUNTS = 30
WORKER_KILLS = 4
SERVER_KILLS = 3


@dataclass
class Target:
    """Where clients send requests; the crash driver moves it when it restarts the server."""

    server: LiveServer
    stop: bool = False
    retried: set[str] = field(default_factory=set)
    unanswered: int = 0


async def crash_client(http: httpx.AsyncClient, target: Target, accounts: list[str], seed: int) -> ClientLog:
    rng = random.Random(seed)
    log = ClientLog()
    charged: list[tuple[str, dict[str, Any]]] = []  # (transaction id, body) of this client's acked charges
    run: tuple[str, str] | None = None  # (hold id, user id) of the hold this client streams captures into
    while not target.stop:
        kind = rng.choice(["charge", "charge", "credit", "refund", "capture", "capture"])
        key = str(uuid.uuid4())
        body: dict[str, Any] = {"user_id": rng.choice(accounts), "amount": rng.randint(1, 25), "description": "crash"}
        path = f"{kind}-tokens"
        if kind == "capture":
            if run is None:
                run = await open_run(http, target, body["user_id"], log)
                if run is None:
                    continue
            body = {"amount": rng.randint(1, 10)}
            path = f"holds/{run[0]}/capture"
        if kind == "credit" and rng.random() < 0.5:  # a grant, usually one that expires during the run
            body.update(priority=rng.randint(0, 100), category=rng.choice(["paid", "promotional"]))
            if rng.random() < 0.7:
                body["expires_at"] = (datetime.now(UTC) + timedelta(seconds=rng.uniform(1, 10))).isoformat()
        if kind == "refund":
            if not charged:
                continue
            transaction_id, charge = rng.choice(charged)
            body = {"user_id": charge["user_id"], "amount": rng.randint(1, charge["amount"]), "description": "refund"}
            path = f"transactions/{transaction_id}/refund"
        owner = run[1] if kind == "capture" and run is not None else body["user_id"]
        attempts = 0
        while True:
            attempts += 1
            log.requests += 1
            if attempts > 1:
                target.retried.add(key)
            url = f"{target.server.base_url}/billing/{path}"
            try:
                response = await http.post(url, json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                target.unanswered += 1
                await asyncio.sleep(0.1)
                continue
            if response.status_code == 200:
                log.record(key, kind, owner, body["amount"], response.json())
                if kind == "charge":
                    charged.append((response.json()["transaction_id"], body))
                break
            if response.status_code in (402, 409) and response.json()["code"] in (
                "insufficient_balance",
                "refund_exceeds_charge",
                "capture_exceeds_hold",
                "hold_not_active",
            ):
                log.refused.add(key)
                if kind == "capture":
                    run = None  # the run's budget is spent: the next capture opens another hold
                break
            if response.status_code == 422 and response.json()["code"] == "expires_at_in_past":
                # Its first attempt died with the server before committing, and its grant's expiry has passed
                # since: refused, nothing moved (a committed first attempt would have replayed).
                assert datetime.fromisoformat(body["expires_at"]) <= datetime.now(UTC), body
                log.refused.add(key)
                break
            if response.status_code in (409, 503):
                await asyncio.sleep(0.1)
                continue
            log.violations.append(f"{kind} {key}: {response.status_code} {response.text}")
            break
    return log


async def open_run(http: httpx.AsyncClient, target: Target, user_id: str, log: ClientLog) -> tuple[str, str] | None:
    """A hold of 60 tokens for a run, retried with its key until answered; None when the account cannot fund it."""
    key = str(uuid.uuid4())
    body = {"user_id": user_id, "amount": 60, "description": "crash run", "ttl_seconds": 600}
    while not target.stop:
        log.requests += 1
        try:
            response = await http.post(
                f"{target.server.base_url}/billing/holds", json=body, headers={"Idempotency-Key": key}
            )
        except httpx.TransportError:
            target.unanswered += 1
            await asyncio.sleep(0.1)
            continue
        if response.status_code in (200, 201):
            return response.json()["hold_id"], user_id
        if response.status_code == 402:
            return None
        if response.status_code not in (409, 503):
            log.violations.append(f"hold {key}: {response.status_code} {response.text}")
            return None
        await asyncio.sleep(0.1)
    return None


def kill_a_worker(server: LiveServer) -> tuple[int, float]:
    """kill -9 one worker; wait for uvicorn to start a replacement. Returns (killed pid, respawn seconds)."""
    workers = worker_processes(server.process.pid)
    assert len(workers) == 2, workers
    victim = random.choice(workers)
    victim.kill()
    started = time.monotonic()

    def replaced() -> bool:
        try:
            alive = {p.pid for p in worker_processes(server.process.pid) if p.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:  # a worker vanished between listing and asking: look again
            return False
        return len(alive) == 2 and victim.pid not in alive

    respawned = wait_for(replaced, timeout=30)
    assert respawned, "uvicorn did not replace the killed worker"
    return victim.pid, time.monotonic() - started


def kill_the_server(server: LiveServer) -> LiveServer:
    """kill -9 the whole process group (supervisor and workers), then start a new server on the same database."""
    workers = worker_processes(server.process.pid)
    kill_process_group(server.process.pid)
    server.process.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive
    return start_server(server.database_url, workers=2)


async def run_crashes(target: Target, accounts: list[str]) -> dict[str, Any]:
    faults: list[str] = []
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(headers=headers, timeout=20) as http:
        funding = ClientLog()
        for user_id in accounts:
            key = str(uuid.uuid4())
            response = await http.post(
                f"{target.server.base_url}/billing/credit-tokens",
                json={"user_id": user_id, "amount": 400, "description": "funding"},
                headers={"Idempotency-Key": key},
            )
            assert response.status_code == 200, response.text
            funding.record(key, "credit", user_id, 400, response.json())
        clients = [asyncio.create_task(crash_client(http, target, accounts, seed)) for seed in range(CLIENTS)]
        try:
            for round_number in range(max(WORKER_KILLS, SERVER_KILLS)):
                await asyncio.sleep(2)
                if round_number < WORKER_KILLS:
                    pid, respawn = await asyncio.to_thread(kill_a_worker, target.server)
                    faults.append(f"kill -9 worker {pid} (respawned in {respawn:.1f} s)")
                    await asyncio.sleep(1.5)
                if round_number < SERVER_KILLS:
                    target.server = await asyncio.to_thread(kill_the_server, target.server)
                    faults.append("kill -9 server process group, restart")
            await asyncio.sleep(2)
        finally:
            target.stop = True
            logs = await asyncio.gather(*clients)
    return {"log": merge([funding, *logs]), "faults": faults}


def test_kill_9_of_workers_and_server_loses_no_acknowledged_write(own_database):
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    target = Target(server=start_server(own_database, workers=2))
    try:
        result = asyncio.run(run_crashes(target, accounts))
    finally:
        stop_server(target.server.process)
    log: ClientLog = result["log"]
    retried_acked = target.retried & set(log.acked)
    retried_refused = target.retried & log.refused
    print(
        f"\ncrash: {log.requests} requests, {len(result['faults'])} faults ({'; '.join(result['faults'])});"
        f" {target.unanswered} requests got no answer, {len(target.retried)} keys retried"
        f" ({len(retried_acked)} posted once, {len(retried_refused)} refused);"
        f" {len(log.acked)} acknowledged writes ({dict(Counter(ack.kind for ack in log.acked.values()))});"
        f" {len(log.violations)} client violations"
    )
    assert len(result["faults"]) == WORKER_KILLS + SERVER_KILLS
    assert target.retried, "no request was cut off: the faults did not land under load"
    assert {ack.kind for ack in log.acked.values()} == {"charge", "credit", "refund", "capture"}
    assert not log.violations, log.violations[:5]
    # Every retried request ended with an answer: posted (exactly once, checked below) or refused (no row).
    assert target.retried == retried_acked | retried_refused
    assert model_violations(own_database, log, accounts) == []
    assert ledger_violations(own_database) == []
    audit = run_audit(own_database)
    assert audit.returncode == 0, audit.stdout + audit.stderr
