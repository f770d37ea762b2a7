"""The charge batcher (BILLING_BATCH_CHARGES): many charges per commit, each decided on its own, in order."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from conftest import LiveServer, fund, ledger_state, start_server, stop_server


@pytest.fixture(scope="module")
def batching_server(database_url: str) -> Iterator[LiveServer]:
    # Small batches and two in flight, so a few hundred concurrent charges make many multi-charge batches.
    live = start_server(database_url, workers=2, BILLING_BATCH_CHARGES="true", BILLING_BATCH_MAX_SIZE="16")
    yield live
    stop_server(live.process)


async def _charges(server: LiveServer, bodies: list[dict], keys: list[str | None]) -> list:
    async with server.async_client(limits=httpx.Limits(max_connections=300)) as http:
        requests = [
            http.post("/billing/charge-tokens", json=body, headers={"Idempotency-Key": key} if key else {})
            for body, key in zip(bodies, keys, strict=True)
        ]
        return await asyncio.gather(*requests)


def test_batched_charges_on_one_account_never_overdraw(batching_server, db):
    user = uuid.uuid4()
    with batching_server.client() as http:
        fund(http, user, 50)
    bodies = [{"user_id": str(user), "amount": 1, "description": f"hot {n}"} for n in range(200)]
    responses = asyncio.run(_charges(batching_server, bodies, [None] * 200))
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: 50, 402: 150}
    assert sorted(response.json()["balance"] for response in responses if response.status_code == 200) == list(
        range(50)
    )
    assert ledger_state(db, user) == (0, 0, 51)


def test_a_refused_charge_does_not_fail_its_neighbours_and_order_is_kept(batching_server, db):
    users = [uuid.uuid4() for _ in range(20)]
    with batching_server.client() as http:
        for user in users:
            fund(http, user, 10)
    # Per user: 7 fits, 7 more does not, 3 still fits after the refusal.
    bodies = []
    for user in users:
        bodies += [{"user_id": str(user), "amount": amount, "description": "mix"} for amount in (7, 7, 3)]
    bodies.append({"user_id": str(uuid.uuid4()), "amount": 1, "description": "unknown user"})
    responses = asyncio.run(_charges(batching_server, bodies, [None] * len(bodies)))
    assert responses[-1].status_code == 402 and responses[-1].json()["code"] == "account_not_found"
    for user in users:
        balance, ledger_sum, rows = ledger_state(db, user)
        assert balance == ledger_sum and balance >= 0
        # Whatever order the three arrived in, exactly the amounts that fit were taken, and nothing else.
        assert 10 - balance in (7 + 3, 7, 3 + 7)
    audit = subprocess.run(
        [sys.executable, "-m", "billing_service", "audit"],
        env=batching_server.env,
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_duplicate_keys_in_flight_together_charge_once(batching_server, db):
    user = uuid.uuid4()
    with batching_server.client() as http:
        fund(http, user, 1000)
    body = {"user_id": str(user), "amount": 5, "description": "same request"}
    responses = asyncio.run(_charges(batching_server, [body] * 40, ["dup-key"] * 40))
    assert {response.status_code for response in responses} <= {200, 409}
    ok = [response for response in responses if response.status_code == 200]
    assert len({response.json()["transaction_id"] for response in ok}) == 1
    assert sum(response.headers.get("Idempotent-Replayed") == "true" for response in ok) == len(ok) - 1
    assert ledger_state(db, user) == (995, 995, 2)


def test_same_key_with_another_body_in_one_batch_is_refused(batching_server, db):
    user = uuid.uuid4()
    with batching_server.client() as http:
        fund(http, user, 1000)
    first = {"user_id": str(user), "amount": 5, "description": "a"}
    second = {"user_id": str(user), "amount": 6, "description": "b"}
    responses = asyncio.run(_charges(batching_server, [first, second] * 10, ["k"] * 20))
    codes = Counter(
        response.json().get("code", "ok") if response.status_code != 200 else "ok" for response in responses
    )
    # Exactly one of the two bodies wins the key; every request with the other body is told the key is taken.
    assert codes["ok"] == 10 and codes["idempotency_key_reused"] == 10
    balance, ledger_sum, rows = ledger_state(db, user)
    assert rows == 2 and balance == ledger_sum and balance in (995, 994)


def test_with_the_outbox_off_a_batched_charge_rearms_the_low_balance_alert_as_the_statement_does(database_url, db):
    """events/sql.py lowering_set re-arms balance.low whenever a debit leaves available at or above the
    threshold, outbox on or off; the batch must leave the flag the single statement (here `billing charge`, the
    same ledger code) leaves."""
    live = start_server(
        database_url,
        workers=1,
        BILLING_EVENTS="false",
        BILLING_BATCH_CHARGES="true",
        BILLING_DISPATCHER="false",
        BILLING_POOL_MAX_SIZE="4",
    )
    try:
        batched, single = uuid.uuid4(), uuid.uuid4()
        with live.client() as http:
            fund(http, batched, 100)
            fund(http, single, 100)
            # Disarmed, as a crossing while the outbox was on would have left them.
            db.execute(
                "UPDATE accounts SET low_balance_threshold = 50, low_balance_armed = false WHERE user_id = ANY(%s)",
                ([batched, single],),
            )
            response = http.post(
                "/billing/charge-tokens", json={"user_id": str(batched), "amount": 10, "description": "batched"}
            )
            assert response.status_code == 200, response.text
        charged = subprocess.run(
            [sys.executable, "-m", "billing_service", "charge", str(single), "10", "-d", "single"],
            env=live.env,
            capture_output=True,
            text=True,
        )
        assert charged.returncode == 0, charged.stdout + charged.stderr
        armed = dict(
            db.execute(
                "SELECT user_id, low_balance_armed FROM accounts WHERE user_id = ANY(%s)", ([batched, single],)
            ).fetchall()
        )
        assert armed == {batched: True, single: True}
    finally:
        stop_server(live.process)
