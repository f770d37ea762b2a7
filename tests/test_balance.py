"""GET /billing/balance/{user_id}."""

from __future__ import annotations

from conftest import fund


def test_balance_of_a_funded_account(client, user_id):
    fund(client, user_id, 100)
    client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 40, "description": "x"})
    response = client.get(f"/billing/balance/{user_id}")
    assert response.status_code == 200
    assert {"user_id": str(user_id), "balance": 60}.items() <= response.json().items()


def test_balance_of_an_unknown_user_is_404_account_not_found(client, user_id):
    response = client.get(f"/billing/balance/{user_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": "No account for this user.", "code": "account_not_found"}


def test_balance_accepts_any_uuid_spelling_and_answers_the_canonical_one(client, user_id):
    fund(client, user_id, 1)
    for spelling in (str(user_id).upper(), user_id.hex):
        response = client.get(f"/billing/balance/{spelling}")
        assert response.status_code == 200, spelling
        assert {"user_id": str(user_id), "balance": 1}.items() <= response.json().items()
