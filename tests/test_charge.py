"""POST /billing/charge-tokens: the atomic debit."""

from __future__ import annotations

import uuid

from conftest import fund, ledger_state


def test_charge_debits_and_returns_the_new_balance(client, db, user_id):
    fund(client, user_id, 100)
    response = client.post(
        "/billing/charge-tokens", json={"user_id": str(user_id), "amount": 30, "description": "run 1"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert body["balance"] == 70
    uuid.UUID(body["transaction_id"])
    assert ledger_state(db, user_id) == (70, 70, 2)


def test_charge_beyond_the_balance_is_refused_and_moves_nothing(client, db, user_id):
    fund(client, user_id, 10)
    response = client.post(
        "/billing/charge-tokens", json={"user_id": str(user_id), "amount": 11, "description": "too much"}
    )
    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_balance"
    assert ledger_state(db, user_id) == (10, 10, 1)


def test_charge_of_an_unknown_user_is_402_account_not_found(client, db, user_id):
    response = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 1, "description": "x"})
    assert response.status_code == 402
    assert response.json() == {"detail": "No account for this user.", "code": "account_not_found"}
    assert ledger_state(db, user_id) == (None, 0, 0)
