"""POST /billing/charge-tokens: the atomic debit."""

from __future__ import annotations

import uuid

import psycopg
import pytest

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


def test_the_seed_status_success_is_a_subset_of_the_answer(client, user_id):
    fund(client, user_id, 5)
    response = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 5, "description": "a"})
    assert response.status_code == 200
    body = response.json()
    assert {"status": "success"}.items() <= body.items()
    assert set(body) == {"status", "transaction_id", "balance"}


def test_charge_of_the_whole_balance_leaves_zero(client, db, user_id):
    fund(client, user_id, 42)
    response = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 42, "description": "all"})
    assert response.status_code == 200
    assert response.json()["balance"] == 0
    again = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 1, "description": "more"})
    assert again.status_code == 402
    assert again.json()["code"] == "insufficient_balance"
    assert ledger_state(db, user_id) == (0, 0, 2)


def test_charge_writes_one_signed_debit_row_with_its_balance_after(client, db, user_id):
    fund(client, user_id, 100)
    response = client.post(
        "/billing/charge-tokens",
        json={"user_id": str(user_id), "amount": 30, "description": "run 7", "metadata": {"model": "m1", "tokens": 30}},
    )
    assert response.status_code == 200
    row = db.execute(
        "SELECT id, type, amount, balance_after, description, metadata FROM transactions"
        " WHERE user_id = %s AND type = 'debit'",
        (user_id,),
    ).fetchone()
    assert row is not None
    assert str(row[0]) == response.json()["transaction_id"]
    assert row[1:] == ("debit", -30, 70, "run 7", {"model": "m1", "tokens": 30})


def test_refused_charge_says_what_the_balance_is(client, user_id):
    fund(client, user_id, 3)
    response = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 4, "description": "x"})
    assert response.status_code == 402
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert "3" in body["detail"] and "4" in body["detail"]


def test_charge_of_the_largest_amount_is_accepted(client, db, user_id):
    largest = 2**53 - 1
    fund(client, user_id, largest)
    response = client.post(
        "/billing/charge-tokens", json={"user_id": str(user_id), "amount": largest, "description": "max"}
    )
    assert response.status_code == 200
    assert response.json()["balance"] == 0
    assert ledger_state(db, user_id) == (0, 0, 2)


def test_the_database_refuses_a_negative_balance_even_if_the_code_did_not(db, client, user_id):
    # The CHECK constraint is the backstop behind the conditional UPDATE.
    fund(client, user_id, 1)
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE accounts SET balance = balance - 2 WHERE user_id = %s", (user_id,))
    assert ledger_state(db, user_id) == (1, 1, 1)
