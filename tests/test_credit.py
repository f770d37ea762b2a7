"""POST /billing/credit-tokens: credits open the account, and the balance never overflows into a 500."""

from __future__ import annotations

import uuid

from conftest import give_opening_grants, ledger_state

BIGINT_MAX = 2**63 - 1


def credit(client, user_id, amount, description="top-up", **headers):
    return client.post(
        "/billing/credit-tokens",
        json={"user_id": str(user_id), "amount": amount, "description": description},
        headers=headers,
    )


def test_credit_opens_the_account_on_first_use(client, db, user_id):
    assert ledger_state(db, user_id) == (None, 0, 0)
    response = credit(client, user_id, 25)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert body["balance"] == 25
    uuid.UUID(body["transaction_id"])
    assert ledger_state(db, user_id) == (25, 25, 1)
    assert {"user_id": str(user_id), "balance": 25}.items() <= client.get(f"/billing/balance/{user_id}").json().items()


def test_credits_add_up_and_each_writes_a_positive_credit_row(client, db, user_id):
    assert credit(client, user_id, 10).json()["balance"] == 10
    assert credit(client, user_id, 15).json()["balance"] == 25
    rows = db.execute(
        "SELECT seq, type, amount, balance_after FROM transactions WHERE user_id = %s ORDER BY seq", (user_id,)
    ).fetchall()
    assert rows == [(1, "credit", 10, 10), (2, "credit", 15, 25)]


def test_credit_of_an_opened_empty_account(client, db, user_id):
    assert client.post("/billing/accounts", json={"user_id": str(user_id)}).status_code == 201
    assert credit(client, user_id, 7).json()["balance"] == 7
    assert ledger_state(db, user_id) == (7, 7, 1)


def _account_near_the_limit(db, user_id, balance):
    """An account whose (consistent) ledger already holds `balance`: one credit row, as if migrated in."""
    db.execute("INSERT INTO accounts (user_id, balance, last_seq) VALUES (%s, %s, 1)", (user_id, balance))
    db.execute(
        "INSERT INTO transactions (user_id, seq, type, amount, balance_after, description)"
        " VALUES (%s, 1, 'credit', %s, %s, 'opening balance')",
        (user_id, balance, balance),
    )
    give_opening_grants(db)


def test_credit_past_the_bigint_limit_is_a_clean_422_and_moves_nothing(client, db, user_id):
    _account_near_the_limit(db, user_id, BIGINT_MAX - 5)
    response = credit(client, user_id, 6, **{"Idempotency-Key": "overflow"})
    assert response.status_code == 422
    assert response.json()["code"] == "balance_limit_exceeded"
    assert set(response.json()) == {"detail", "code"}
    assert ledger_state(db, user_id) == (BIGINT_MAX - 5, BIGINT_MAX - 5, 1)
    # The refused credit left no key behind: the same key now works for an amount that fits.
    fits = credit(client, user_id, 5, **{"Idempotency-Key": "overflow"})
    assert fits.status_code == 200
    assert fits.json()["balance"] == BIGINT_MAX
    assert ledger_state(db, user_id) == (BIGINT_MAX, BIGINT_MAX, 2)
