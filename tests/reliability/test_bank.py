"""The bank test (after Jepsen's): many clients move money at random; no money is ever lost or minted.

32 clients, 100 accounts, 20,000+ requests: charges, credits (a third of them grants with a priority and a
category, most of those expiring during the run), refunds of acknowledged charges, charges that must be
refused, retries with the same Idempotency-Key (sequential and concurrent), and one hot account that a quarter
of the operations hit. Every acknowledged answer is logged. At checkpoints (while money moves, and with all
clients paused) and at the end, the ledger is checked against itself and against the clients' acknowledgements.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import SERVICE_TOKEN, LiveServer

from .helpers import ClientLog, ledger_violations, merge, model_violations, run_audit

CLIENTS = 32
ACCOUNTS = 100
ROUNDS = 4
OPERATIONS_PER_ROUND = 5_200  # 4 rounds x 5,200 > 20,000 requests
HOT_SHARE = 0.25
IMPOSSIBLE_AMOUNT = 10**15  # more than any account here can ever hold

pytestmark = pytest.mark.slow


class BankClient:
    """One client: picks operations at random and logs every answer it gets."""

    def __init__(self, http: httpx.AsyncClient, accounts: list[str], seed: int) -> None:
        self.http = http
        self.accounts = accounts
        self.random = random.Random(seed)
        self.log = ClientLog()
        self.sent: list[tuple[str, str, dict[str, Any]]] = []  # acked requests, for retries

    def pick_account(self) -> str:
        if self.random.random() < HOT_SHARE:
            return self.accounts[0]
        return self.random.choice(self.accounts[1:])

    async def post(self, kind: str, key: str, body: dict[str, Any]) -> httpx.Response:
        """No fault is injected here, so a 5xx or a dropped connection is itself a violation. The request is
        still retried with its key until it gets an answer, so the ledger can be checked against the log."""
        path = f"/billing/transactions/{body['refund_of']}/refund" if kind == "refund" else f"/billing/{kind}-tokens"
        payload = {name: value for name, value in body.items() if name != "refund_of"}
        for _ in range(10):
            self.log.requests += 1
            try:
                response = await self.http.post(path, json=payload, headers={"Idempotency-Key": key})
            except httpx.TransportError as exc:
                self.log.violations.append(f"{kind} {key}: no answer ({exc!r})")
                continue
            if response.status_code < 500:
                return response
            self.log.violations.append(f"{kind} {key}: {response.status_code} {response.text}")
        raise AssertionError(f"{kind} {key} got no answer in 10 tries: {self.log.violations[-3:]}")

    def acknowledge(self, kind: str, key: str, body: dict[str, Any], response: httpx.Response) -> None:
        self.log.record(key, kind, body["user_id"], body["amount"], response.json())
        self.sent.append((kind, key, body))

    def grant_terms(self) -> dict[str, Any]:
        """A third of the credits are grants with terms: some expire while the bank runs, so expiry rows, the
        draw order across grants and debits spanning several of them are all in the mix."""
        if self.random.random() > 0.33:
            return {}
        terms: dict[str, Any] = {
            "priority": self.random.randint(0, 100),
            "category": self.random.choice(["paid", "promotional"]),
        }
        if self.random.random() < 0.7:
            terms["expires_at"] = (datetime.now(UTC) + timedelta(seconds=self.random.uniform(2, 30))).isoformat()
        return terms

    @staticmethod
    def expired(body: dict[str, Any]) -> bool:
        return "expires_at" in body and datetime.fromisoformat(body["expires_at"]) <= datetime.now(UTC)

    async def write(self, kind: str, amount: int, *, must_fail: bool = False) -> None:
        key, body = str(uuid.uuid4()), {"user_id": self.pick_account(), "amount": amount, "description": kind}
        if kind == "credit":
            body.update(self.grant_terms())
        response = await self.post(kind, key, body)
        if response.status_code == 200:
            if must_fail:
                self.log.violations.append(f"charge of {amount} was accepted: {response.text}")
            self.acknowledge(kind, key, body, response)
        elif response.status_code == 402 and kind == "charge" and response.json()["code"] == "insufficient_balance":
            self.log.refused.add(key)
        elif response.status_code == 422 and response.json()["code"] == "expires_at_in_past" and self.expired(body):
            self.log.refused.add(key)  # it reached the ledger after its own expires_at: refused, nothing moved
        else:
            self.log.violations.append(f"{kind} {key}: unexpected {response.status_code} {response.text}")

    async def refund(self) -> None:
        """Give back part of an acknowledged charge; refunds of one charge may not add up to more than it."""
        charges = [(key, body) for kind, key, body in self.sent if kind == "charge"]
        if not charges:
            return
        charge_key, charge = self.random.choice(charges)
        ack = self.log.acked[charge_key]
        key = str(uuid.uuid4())
        body = {
            "user_id": charge["user_id"],
            "amount": self.random.randint(1, charge["amount"]),
            "description": "refund",
            "refund_of": ack.transaction_id,
        }
        response = await self.post("refund", key, body)
        if response.status_code == 200:
            self.acknowledge("refund", key, body, response)
        elif response.status_code == 409 and response.json()["code"] == "refund_exceeds_charge":
            self.log.refused.add(key)
        else:
            self.log.violations.append(f"refund {key}: unexpected {response.status_code} {response.text}")

    async def retry(self) -> None:
        """Send an acknowledged request again: same key, same body. It must replay, never post again."""
        if not self.sent:
            return
        kind, key, body = self.random.choice(self.sent)
        response = await self.post(kind, key, body)
        self.log.replays += 1
        if response.status_code != 200 or response.headers.get("Idempotent-Replayed") != "true":
            self.log.violations.append(f"retry of {key}: {response.status_code} {response.text}")
            return
        self.log.record(key, kind, body["user_id"], body["amount"], response.json())

    async def twins(self) -> None:
        """The same new charge sent twice at once: at most one posts; the other replays it, is told to retry, or
        was refused against the balance it saw before its twin's funds arrived (refusals keep no key)."""
        key, body = str(uuid.uuid4()), {"user_id": self.pick_account(), "amount": 1, "description": "twin"}
        responses = await asyncio.gather(self.post("charge", key, body), self.post("charge", key, body))
        statuses = sorted(response.status_code for response in responses)
        for response in responses:
            if response.status_code == 200:
                self.log.record(key, "charge", body["user_id"], 1, response.json())
        if statuses in ([200, 200], [200, 402], [200, 409]):
            self.sent.append(("charge", key, body))
        elif statuses == [402, 402]:
            self.log.refused.add(key)
        else:
            self.log.violations.append(f"twins {key}: {statuses} {[r.text for r in responses]}")

    async def run(self, operations: int) -> None:
        for _ in range(operations):
            roll = self.random.random()
            if roll < 0.39:
                await self.write("charge", self.random.randint(1, 60))
            elif roll < 0.42:
                await self.refund()
            elif roll < 0.67:
                await self.write("credit", self.random.randint(1, 40))
            elif roll < 0.75:
                await self.write("charge", IMPOSSIBLE_AMOUNT, must_fail=True)
            elif roll < 0.95:
                await self.retry()
            else:
                await self.twins()


class Checker:
    """Checks the ledger's own invariants in a background thread, every second, while money moves."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.checks = 0
        self.violations: list[tuple[str, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.wait(1.0):
            self.violations += ledger_violations(self.database_url)
            self.checks += 1

    def __enter__(self) -> Checker:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def quiescent_checkpoint(database_url: str, log: ClientLog, accounts: list[str]) -> list[str]:
    """With no request in flight, everything must agree exactly."""
    problems = [f"{kind}: {user} at {at}" for kind, user, at in ledger_violations(database_url)]
    problems += model_violations(database_url, log, accounts)
    audit = run_audit(database_url)
    if audit.returncode != 0:
        problems.append(f"billing audit exited {audit.returncode}: {audit.stdout}{audit.stderr}")
    return problems


async def run_bank(server: LiveServer, database_url: str, log_path: Path) -> dict[str, Any]:
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    limits = httpx.Limits(max_connections=2 * CLIENTS, max_keepalive_connections=2 * CLIENTS)
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60, limits=limits) as http:
        for user_id in accounts:
            response = await http.post("/billing/accounts", json={"user_id": user_id})
            assert response.status_code == 201, response.text
        clients = [BankClient(http, accounts, seed) for seed in range(CLIENTS)]
        # Fund every account once so charges have something to take; these credits are acknowledged too.
        for index, user_id in enumerate(accounts):
            funder = clients[index % CLIENTS]
            key, body = str(uuid.uuid4()), {"user_id": user_id, "amount": 1500, "description": "opening credit"}
            response = await funder.post("credit", key, body)
            assert response.status_code == 200, response.text
            funder.acknowledge("credit", key, body, response)

        checkpoints: list[list[str]] = []
        started = time.monotonic()
        with Checker(database_url) as checker:
            for _ in range(ROUNDS):
                await asyncio.gather(*(client.run(OPERATIONS_PER_ROUND // CLIENTS) for client in clients))
                checkpoints.append(
                    await asyncio.to_thread(
                        quiescent_checkpoint, database_url, merge([c.log for c in clients]), accounts
                    )
                )
        elapsed = time.monotonic() - started

    log = merge([client.log for client in clients])
    with log_path.open("w") as out:
        for ack in log.acked.values():
            out.write(json.dumps(ack.__dict__) + "\n")
    return {
        "log": log,
        "accounts": accounts,
        "checkpoints": checkpoints,
        "live_checks": checker.checks,
        "live_violations": checker.violations,
        "elapsed": elapsed,
    }


def test_bank_no_money_is_lost_or_minted_under_concurrency(own_server, own_database, tmp_path):
    result = asyncio.run(run_bank(own_server, own_database, tmp_path / "acked.jsonl"))
    log: ClientLog = result["log"]
    charges = sum(1 for ack in log.acked.values() if ack.kind == "charge")
    refunds = sum(1 for ack in log.acked.values() if ack.kind == "refund")
    print(
        f"\nbank: {log.requests} requests in {result['elapsed']:.1f} s by {CLIENTS} clients on {ACCOUNTS} accounts;"
        f" {len(log.acked)} acknowledged writes ({charges} charges, {refunds} refunds), {len(log.refused)} refused,"
        f" {log.replays} retries; {result['live_checks']} live checks + {len(result['checkpoints'])} checkpoints;"
        f" violations: {len(log.violations)} client, {len(result['live_violations'])} live,"
        f" {sum(map(len, result['checkpoints']))} at checkpoints"
    )
    assert log.requests >= 20_000
    assert log.refused, "no charge was refused: the test did not exercise the overdraft guard"
    assert refunds, "no refund was acknowledged: the test did not exercise refunds"
    assert not log.violations, log.violations[:10]
    assert not result["live_violations"], result["live_violations"][:10]
    for number, problems in enumerate(result["checkpoints"], 1):
        assert not problems, f"checkpoint {number}: {problems[:10]}"
