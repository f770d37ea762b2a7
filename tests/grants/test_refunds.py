"""Refunds: back to the grants that paid, last drawn first; never more than the charge, even when raced."""

from __future__ import annotations

import asyncio
import uuid

from conftest import ledger_state
from grants.helpers import at, charge, funding_of, grant, grant_problems, history, remaining, wait_until


def refund(client, user_id, transaction_id, amount=None, **headers):
    body = {"user_id": str(user_id), "description": "model call failed"}
    if amount is not None:
        body["amount"] = amount
    return client.post(f"/billing/transactions/{transaction_id}/refund", json=body, headers=headers)


def test_a_refund_goes_back_to_the_grants_that_paid_last_drawn_first(client, db, user_id):
    paid = grant(client, user_id, 100)
    trial = grant(client, user_id, 30, priority=10, category="promotional", expires_at=at(86400))
    debit = charge(client, user_id, 50).json()["transaction_id"]  # trial 30, then paid 20

    first = refund(client, user_id, debit, 15)
    assert first.status_code == 200, first.text
    assert first.json() | {"transaction_id": None} == {
        "status": "success",
        "transaction_id": None,
        "refund_of": debit,
        "amount": 15,
        "balance": 95,
        "refunded_total": 15,
    }
    second = refund(client, user_id, debit, 10)  # 5 more paid, then 5 of the trial
    assert second.json()["refunded_total"] == 25
    refunds = [row for row in history(client, user_id) if row["type"] == "refund"]
    assert [(row["amount"], row["refund_of"], funding_of(row)) for row in refunds] == [
        (15, debit, [(paid, 15)]),
        (10, debit, [(paid, 5), (trial, 5)]),
    ]
    assert remaining(client, user_id) == {trial: 5, paid: 100}

    rest = refund(client, user_id, debit)  # no amount: all that is left
    assert rest.status_code == 200 and rest.json()["amount"] == 25 and rest.json()["refunded_total"] == 50
    over = refund(client, user_id, debit, 1)
    assert over.status_code == 409 and over.json()["code"] == "refund_exceeds_charge"
    assert remaining(client, user_id) == {trial: 30, paid: 100}
    balance, ledger_sum, _ = ledger_state(db, user_id)
    assert balance == ledger_sum == 130
    events = db.execute(
        "SELECT (data ->> 'amount')::int, (data ->> 'refunded_total')::int FROM events"
        " WHERE user_id = %s AND type = 'refund.posted' ORDER BY seq",
        (user_id,),
    ).fetchall()
    assert events == [(15, 15), (10, 25), (25, 50)]
    assert grant_problems(db, user_id) == []


def test_a_refund_into_a_grant_that_expired_since_becomes_a_grant_of_its_own(client, db, user_id):
    grant(client, user_id, 100)
    moment = at(1.2)
    trial = grant(client, user_id, 30, priority=10, category="promotional", expires_at=moment)
    debit = charge(client, user_id, 20).json()["transaction_id"]
    wait_until(moment)
    answer = refund(client, user_id, debit, 20)
    assert answer.status_code == 200, answer.text
    [row] = [row for row in history(client, user_id) if row["type"] == "refund"]
    [(new_grant, amount)] = funding_of(row)
    assert new_grant != trial and amount == 20
    listed = {item["grant_id"]: item for item in client.get(f"/billing/grants/{user_id}").json()}
    assert {
        k: listed[new_grant][k] for k in ("amount", "remaining", "priority", "category", "expires_at", "source")
    } == {
        "amount": 20,
        "remaining": 20,
        "priority": 10,
        "category": "promotional",
        "expires_at": None,
        "source": "refund",
    }
    assert client.get(f"/billing/balance/{user_id}").json()["balance"] == 120  # 100 paid + 20 refunded
    assert grant_problems(db, user_id) == []


def test_what_cannot_be_refunded_is_a_clear_4xx_and_moves_nothing(client, db, user_id):
    credit = client.post(
        "/billing/credit-tokens", json={"user_id": str(user_id), "amount": 40, "description": "top-up"}
    ).json()["transaction_id"]
    debit = charge(client, user_id, 10).json()["transaction_id"]
    stranger = uuid.uuid4()
    assert refund(client, user_id, credit, 5).json()["code"] == "not_refundable"
    assert refund(client, user_id, credit, 5).status_code == 422
    assert refund(client, user_id, uuid.uuid4(), 5).status_code == 404  # unknown
    foreign = refund(client, stranger, debit, 5)  # someone else's charge
    assert foreign.status_code == 404 and foreign.json()["code"] == "transaction_not_found"
    assert refund(client, user_id, debit, 11).json()["code"] == "refund_exceeds_charge"
    for bad in ({"amount": 0}, {"amount": -3}, {"amount": "5"}, {"extra": 1}):
        body = {"user_id": str(user_id), "description": "x", **bad}
        response = client.post(f"/billing/transactions/{debit}/refund", json=body)
        assert response.status_code == 422 and set(response.json()) == {"detail", "code"}, response.text
    assert ledger_state(db, user_id) == (30, 30, 2)


def test_a_retried_refund_replays_and_a_reused_key_is_refused(client, db, user_id):
    grant(client, user_id, 50)
    debit = charge(client, user_id, 20).json()["transaction_id"]
    first = refund(client, user_id, debit, 8, **{"Idempotency-Key": "refund-1"})
    again = refund(client, user_id, debit, 8, **{"Idempotency-Key": "refund-1"})
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    reused = refund(client, user_id, debit, 9, **{"Idempotency-Key": "refund-1"})
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    assert ledger_state(db, user_id) == (38, 38, 3)


def test_fifty_concurrent_refunds_of_one_charge_never_exceed_it(server, db, user_id):
    with server.client() as client:
        grant(client, user_id, 1000)
        grant(client, user_id, 60, priority=10, expires_at=at(86400))
        debit = charge(client, user_id, 100).json()["transaction_id"]

    async def race() -> list[int]:
        async with server.async_client() as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"/billing/transactions/{debit}/refund",
                        json={"user_id": str(user_id), "amount": 7, "description": "raced"},
                    )
                    for _ in range(50)
                )
            )
        return [response.status_code for response in responses]

    statuses = asyncio.run(race())
    assert statuses.count(200) == 14 and statuses.count(409) == 36  # 14 x 7 = 98 <= 100 < 105
    refunded = db.execute(
        "SELECT coalesce(sum(amount), 0) FROM transactions WHERE user_id = %s AND refund_of = %s", (user_id, debit)
    ).fetchone()[0]
    assert refunded == 98
    balance, ledger_sum, _ = ledger_state(db, user_id)
    assert balance == ledger_sum == 1060 - 100 + 98
    assert grant_problems(db, user_id) == []
