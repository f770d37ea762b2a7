"""POST /billing/accounts: 201 when the account is new, 200 with its current state when it already exists."""

from __future__ import annotations

import asyncio

from conftest import fund, ledger_state


def open_account(client, user_id, **headers):
    return client.post("/billing/accounts", json={"user_id": str(user_id)}, headers=headers)


def test_a_new_account_is_201_with_balance_zero_and_no_transaction(client, db, user_id):
    response = open_account(client, user_id)
    assert response.status_code == 201
    assert response.json() == {"user_id": str(user_id), "balance": 0}
    assert ledger_state(db, user_id) == (0, 0, 0)


def test_opening_an_existing_account_is_200_with_its_current_state(client, db, user_id):
    assert open_account(client, user_id).status_code == 201
    again = open_account(client, user_id)
    assert again.status_code == 200
    assert again.json() == {"user_id": str(user_id), "balance": 0}
    fund(client, user_id, 12)
    funded = open_account(client, user_id)
    assert funded.status_code == 200
    assert funded.json() == {"user_id": str(user_id), "balance": 12}
    assert ledger_state(db, user_id) == (12, 12, 1)


def test_an_account_opened_by_a_credit_answers_200(client, user_id):
    fund(client, user_id, 3)
    response = open_account(client, user_id)
    assert response.status_code == 200
    assert response.json()["balance"] == 3


def test_an_open_account_has_a_balance_and_an_empty_history(client, user_id):
    open_account(client, user_id)
    assert {"user_id": str(user_id), "balance": 0}.items() <= client.get(f"/billing/balance/{user_id}").json().items()
    history = client.get(f"/billing/transactions/{user_id}")
    assert history.status_code == 200
    assert history.json() == []
    assert client.get(f"/billing/transactions/{user_id}", params={"limit": 5}).json() == []


def test_a_retried_open_with_its_key_is_marked_replayed(client, user_id):
    first = open_account(client, user_id, **{"Idempotency-Key": "open-1"})
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    retry = open_account(client, user_id, **{"Idempotency-Key": "open-1"})
    assert retry.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == first.json()
    other_key = open_account(client, user_id, **{"Idempotency-Key": "open-2"})
    assert other_key.status_code == 200
    assert "Idempotent-Replayed" not in other_key.headers


def test_open_account_takes_only_a_user_id(client, db, user_id):
    response = client.post("/billing/accounts", json={"user_id": str(user_id), "balance": 100})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert ledger_state(db, user_id) == (None, 0, 0)
    missing = client.post("/billing/accounts", json={})
    assert missing.status_code == 422
    assert missing.json()["code"] == "validation_error"


def test_concurrent_opens_create_the_account_once(server, db, user_id):
    async def main():
        async with server.async_client() as http:
            return await asyncio.gather(
                *(http.post("/billing/accounts", json={"user_id": str(user_id)}) for _ in range(20))
            )

    statuses = sorted(response.status_code for response in asyncio.run(main()))
    assert statuses == [200] * 19 + [201]
    assert ledger_state(db, user_id) == (0, 0, 0)
