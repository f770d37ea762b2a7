"""Holds: reserve, capture (several times, final, overrun), release, extend, exact expiry, idempotency, auth."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from conftest import fund, ledger_state, user_jwt


def hold(client, user_id, amount, **extra):
    body = {"user_id": str(user_id), "amount": amount, "description": "agent run", **extra}
    response = client.post("/billing/holds", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def balance(client, user_id):
    """The balance answer's money fields (the grant-expiry fields are tested in tests/grants)."""
    response = client.get(f"/billing/balance/{user_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.pop("expiring") == 0 and body.pop("next_expiry") is None  # these holds' tokens never expire
    return body


def held_column(db, user_id):
    return db.execute("SELECT held FROM accounts WHERE user_id = %s", (user_id,)).fetchone()[0]


def test_a_hold_reserves_available_without_moving_the_posted_balance(client, db, user_id):
    fund(client, user_id, 100)
    created = hold(client, user_id, 60, ttl_seconds=120)
    assert created["amount"] == 60
    assert created["remaining"] == 60
    assert created["status"] == "active"
    assert created["user_id"] == str(user_id)
    expires_at = datetime.fromisoformat(created["expires_at"])
    assert timedelta(seconds=100) < expires_at - datetime.now(UTC) <= timedelta(seconds=121)
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 100, "held": 60, "available": 40}
    assert ledger_state(db, user_id) == (100, 100, 1)


def test_a_hold_beyond_available_is_402_and_reserves_nothing(client, db, user_id):
    fund(client, user_id, 100)
    hold(client, user_id, 70)
    response = client.post("/billing/holds", json={"user_id": str(user_id), "amount": 31, "description": "x"})
    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_balance"
    assert balance(client, user_id)["available"] == 30
    assert held_column(db, user_id) == 70


def test_a_hold_for_an_unknown_user_is_402_account_not_found(client, user_id):
    response = client.post("/billing/holds", json={"user_id": str(user_id), "amount": 1, "description": "x"})
    assert response.status_code == 402
    assert response.json()["code"] == "account_not_found"


def test_a_plain_charge_cannot_take_tokens_reserved_for_a_running_agent(client, db, user_id):
    fund(client, user_id, 100)
    hold(client, user_id, 70)
    refused = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 31, "description": "x"})
    assert refused.status_code == 402
    assert refused.json()["code"] == "insufficient_balance"
    allowed = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 30, "description": "x"})
    assert allowed.status_code == 200
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 70, "held": 70, "available": 0}


def test_captures_stream_from_the_hold_until_remaining_is_zero(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 50)["hold_id"]
    for step, expected_remaining in ((20, 30), (25, 5), (5, 0)):
        response = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": step})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["hold"]["remaining"] == expected_remaining
        uuid.UUID(body["transaction_id"])
    assert body["balance"] == 50
    assert body["hold"]["captured"] == 50
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 50, "held": 0, "available": 50}
    history = client.get(f"/billing/transactions/{user_id}").json()
    captures = [row for row in history if row["type"] == "capture"]
    assert [row["amount"] for row in captures] == [-5, -25, -20]
    assert {row["hold_id"] for row in captures} == {hold_id}
    assert ledger_state(db, user_id) == (50, 50, 4)


def test_capturing_more_than_remaining_is_409_and_moves_nothing(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 10)["hold_id"]
    response = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 11})
    assert response.status_code == 409
    assert response.json()["code"] == "capture_exceeds_hold"
    assert ledger_state(db, user_id) == (100, 100, 1)
    assert balance(client, user_id)["held"] == 10


def test_allow_overrun_takes_the_excess_from_available(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 10)["hold_id"]
    response = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 25, "allow_overrun": True})
    assert response.status_code == 200, response.text
    assert response.json()["hold"]["remaining"] == 0
    assert response.json()["hold"]["captured"] == 25
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 75, "held": 0, "available": 75}


def test_an_overrun_that_available_cannot_cover_is_402_and_moves_nothing(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 10)["hold_id"]
    hold(client, user_id, 85)  # leaves 5 available
    response = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 16, "allow_overrun": True})
    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_balance"
    assert ledger_state(db, user_id) == (100, 100, 1)
    assert balance(client, user_id)["held"] == 95
    exact = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 15, "allow_overrun": True})
    assert exact.status_code == 200
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 85, "held": 85, "available": 0}


def test_a_final_capture_releases_the_rest(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 60)["hold_id"]
    response = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 15, "final": True})
    assert response.status_code == 200
    assert response.json()["hold"]["status"] == "captured"
    assert response.json()["hold"]["remaining"] == 0
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 85, "held": 0, "available": 85}
    again = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 1})
    assert again.status_code == 409
    assert again.json()["code"] == "hold_not_active"


def test_release_voids_the_rest_and_closes_the_hold(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 60)["hold_id"]
    client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 10})
    response = client.post(f"/billing/holds/{hold_id}/release")
    assert response.status_code == 200
    assert response.json()["status"] == "released"
    assert response.json()["captured"] == 10
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 90, "held": 0, "available": 90}
    assert client.post(f"/billing/holds/{hold_id}/release").json()["code"] == "hold_not_active"
    capture = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 1})
    assert capture.status_code == 409
    assert ledger_state(db, user_id) == (90, 90, 2)


def test_extend_renews_the_lease_and_never_shortens_it(client, user_id):
    fund(client, user_id, 100)
    created = hold(client, user_id, 10, ttl_seconds=60)
    longer = client.post(f"/billing/holds/{created['hold_id']}/extend", json={"ttl_seconds": 3600})
    assert longer.status_code == 200
    renewed = datetime.fromisoformat(longer.json()["expires_at"])
    assert renewed - datetime.now(UTC) > timedelta(seconds=3500)
    shorter = client.post(f"/billing/holds/{created['hold_id']}/extend", json={"ttl_seconds": 10})
    assert datetime.fromisoformat(shorter.json()["expires_at"]) == renewed


def test_an_expired_hold_never_counts_against_available_even_unswept(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 80, ttl_seconds=1)["hold_id"]
    time.sleep(1.3)
    # Nothing has swept it: the row still says active and `held` still counts it...
    assert db.execute("SELECT status FROM holds WHERE id = %s", (hold_id,)).fetchone()[0] == "active"
    assert held_column(db, user_id) == 80
    # ...yet reads are exact, and a charge of the whole balance goes through.
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 100, "held": 0, "available": 100}
    assert client.get(f"/billing/holds/{hold_id}").json()["status"] == "expired"
    charged = client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 100, "description": "x"})
    assert charged.status_code == 200, charged.text
    assert held_column(db, user_id) == 0
    capture = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 1})
    assert capture.status_code == 409
    assert capture.json()["code"] == "hold_not_active"
    assert client.post(f"/billing/holds/{hold_id}/extend", json={"ttl_seconds": 60}).status_code == 409


def test_a_new_hold_may_use_tokens_of_an_expired_unswept_one(client, db, user_id):
    fund(client, user_id, 100)
    hold(client, user_id, 100, ttl_seconds=1)
    time.sleep(1.3)
    assert hold(client, user_id, 100)["remaining"] == 100
    assert held_column(db, user_id) == 100


def test_a_hold_is_idempotent_with_a_key(client, db, user_id):
    fund(client, user_id, 100)
    body = {"user_id": str(user_id), "amount": 30, "description": "run"}
    headers = {"Idempotency-Key": "hold-1"}
    first = client.post("/billing/holds", json=body, headers=headers)
    second = client.post("/billing/holds", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert first.json()["hold_id"] == second.json()["hold_id"]
    assert held_column(db, user_id) == 30
    reused = client.post("/billing/holds", json={**body, "amount": 31}, headers=headers)
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"


def test_a_capture_is_idempotent_with_a_key(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 50)["hold_id"]
    headers = {"Idempotency-Key": "capture-1"}
    first = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 10}, headers=headers)
    second = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 10}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["transaction_id"] == second.json()["transaction_id"]
    assert ledger_state(db, user_id) == (90, 90, 2)
    reused = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 11}, headers=headers)
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"
    # The key space is the ledger's: a charge may not reuse a capture's key either.
    charge = client.post(
        "/billing/charge-tokens", json={"user_id": str(user_id), "amount": 10, "description": "x"}, headers=headers
    )
    assert charge.status_code == 422


def test_release_and_extend_are_idempotent_with_a_key(client, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 50)["hold_id"]
    extend = {"Idempotency-Key": "extend-1"}
    assert client.post(f"/billing/holds/{hold_id}/extend", json={"ttl_seconds": 60}, headers=extend).status_code == 200
    replay = client.post(f"/billing/holds/{hold_id}/extend", json={"ttl_seconds": 60}, headers=extend)
    assert replay.headers["Idempotent-Replayed"] == "true"
    other = client.post(f"/billing/holds/{hold_id}/extend", json={"ttl_seconds": 61}, headers=extend)
    assert other.json()["code"] == "idempotency_key_reused"
    release = {"Idempotency-Key": "release-1"}
    assert client.post(f"/billing/holds/{hold_id}/release", headers=release).status_code == 200
    replayed = client.post(f"/billing/holds/{hold_id}/release", headers=release)
    assert replayed.status_code == 200
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["status"] == "released"


def test_holds_are_listed_per_user_and_status(client, user_id):
    fund(client, user_id, 100)
    first = hold(client, user_id, 10)["hold_id"]
    second = hold(client, user_id, 20)["hold_id"]
    client.post(f"/billing/holds/{first}/release")
    active = client.get("/billing/holds", params={"user_id": str(user_id), "status": "active"})
    assert [row["hold_id"] for row in active.json()] == [second]
    everything = client.get("/billing/holds", params={"user_id": str(user_id)})
    assert [row["hold_id"] for row in everything.json()] == [second, first]
    page = client.get("/billing/holds", params={"user_id": str(user_id), "before": second})
    assert [row["hold_id"] for row in page.json()] == [first]


def test_users_read_their_own_holds_and_only_services_write(server, client, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 10)["hold_id"]
    with server.client(token=user_jwt(user_id)) as own:
        assert own.get(f"/billing/holds/{hold_id}").status_code == 200
        assert own.get("/billing/holds", params={"user_id": str(user_id)}).status_code == 200
        write = own.post(f"/billing/holds/{hold_id}/capture", json={"amount": 1})
        assert write.status_code == 403
        create = own.post("/billing/holds", json={"user_id": str(user_id), "amount": 1, "description": "x"})
        assert create.status_code == 403
    with server.client(token=user_jwt(uuid.uuid4())) as stranger:
        assert stranger.get(f"/billing/holds/{hold_id}").json()["code"] == "hold_not_found"
        assert stranger.get("/billing/holds", params={"user_id": str(user_id)}).status_code == 403
    with server.client(token=None) as anonymous:
        assert anonymous.get(f"/billing/holds/{hold_id}").status_code == 401
    assert client.get(f"/billing/holds/{hold_id}").json()["captured"] == 0


def test_bad_hold_requests_are_clear_4xx_and_move_nothing(client, db, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 10)["hold_id"]
    for body in (
        {"user_id": str(user_id), "amount": 1, "description": "x", "ttl_seconds": 0},
        {"user_id": str(user_id), "amount": 1, "description": "x", "ttl_seconds": 86_401},
        {"user_id": str(user_id), "amount": 0, "description": "x"},
        {"user_id": str(user_id), "amount": 1.5, "description": "x"},
        {"user_id": str(user_id), "amount": 1},
        {"user_id": str(user_id), "amount": 1, "description": "x", "metadata": {"input_tokens": "many"}},
    ):
        response = client.post("/billing/holds", json=body)
        assert response.status_code == 422, body
        assert response.json()["code"] == "validation_error"
    for body in ({"amount": 0}, {"amount": 1, "final": "yes"}, {"amount": 1, "surprise": 1}):
        assert client.post(f"/billing/holds/{hold_id}/capture", json=body).status_code == 422, body
    assert client.post(f"/billing/holds/{hold_id}/extend", json={"ttl_seconds": 86_401}).status_code == 422
    missing = uuid.uuid4()
    valid_bodies = {
        "capture": {"amount": 1},
        "release": {},
        "extend": {"ttl_seconds": 60},
        "children": {"amount": 1, "description": "x"},
    }
    for path, body in valid_bodies.items():
        response = client.post(f"/billing/holds/{missing}/{path}", json=body)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "No such hold.", "code": "hold_not_found"}
    assert client.get(f"/billing/holds/{missing}").status_code == 404
    assert client.get("/billing/holds/not-a-uuid").status_code == 422
    assert ledger_state(db, user_id) == (100, 100, 1)
    assert held_column(db, user_id) == 10


def test_capture_metadata_is_stored_on_the_ledger_row(client, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 50)["hold_id"]
    metadata = {"run_id": "run-7", "model": "m-large", "input_tokens": 900, "output_tokens": 100}
    client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 10, "description": "step", "metadata": metadata})
    newest = client.get(f"/billing/transactions/{user_id}", params={"limit": 1}).json()[0]
    assert newest["metadata"] == metadata
    assert newest["description"] == "step"
    assert newest["hold_id"] == hold_id


def test_balance_at_a_past_time_comes_from_the_ledger(client, user_id):
    fund(client, user_id, 100)
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    client.post("/billing/charge-tokens", json={"user_id": str(user_id), "amount": 40, "description": "x"})
    at_between = client.get(f"/billing/balance/{user_id}", params={"at": between.isoformat()})
    assert at_between.status_code == 200
    assert at_between.json()["balance"] == 100
    assert "held" not in at_between.json()
    now = client.get(f"/billing/balance/{user_id}", params={"at": datetime.now(UTC).isoformat()})
    assert now.json()["balance"] == 60
    before = client.get(f"/billing/balance/{user_id}", params={"at": "2000-01-01T00:00:00Z"})
    assert before.json()["balance"] == 0
    naive = client.get(f"/billing/balance/{user_id}", params={"at": "2026-01-01T00:00:00"})
    assert naive.status_code == 422
    assert client.get(f"/billing/balance/{user_id}", params={"at": "yesterday"}).status_code == 422
    assert client.get(f"/billing/balance/{uuid.uuid4()}", params={"at": between.isoformat()}).status_code == 404


def test_audit_checks_hold_accounting(server, client, db, user_id):
    fund(client, user_id, 100)
    hold(client, user_id, 30)

    def audit():
        env = {**server.env, "DATABASE_URL": server.database_url}
        return subprocess.run(
            [sys.executable, "-m", "billing_service", "audit"], env=env, capture_output=True, text=True, timeout=60
        )

    db.execute("UPDATE accounts SET held = held - 1 WHERE user_id = %s", (user_id,))
    try:
        drift = audit()
        assert drift.returncode == 1
        assert f"HOLD DRIFT {user_id}" in drift.stdout
        assert "held is 29 but active holds reserve 30" in drift.stdout
    finally:
        db.execute("UPDATE accounts SET held = held + 1 WHERE user_id = %s", (user_id,))
    clean = audit()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "all holds and grants add up" in clean.stdout
