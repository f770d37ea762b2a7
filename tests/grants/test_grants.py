"""Grants: the draw order, holds reserving the same way, exact expiry, voids, and bad input."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from conftest import fund, ledger_state
from grants.helpers import at, charge, funding_of, grant, grant_problems, history, remaining, wait_until


def test_a_plain_credit_is_a_paid_grant_of_priority_50_that_never_expires(client, db, user_id):
    response = client.post(
        "/billing/credit-tokens", json={"user_id": str(user_id), "amount": 70, "description": "bought"}
    )
    assert response.status_code == 200, response.text
    grant_id = response.json()["grant_id"]
    [listed] = client.get(f"/billing/grants/{user_id}").json()
    assert listed["grant_id"] == grant_id
    assert {k: listed[k] for k in ("amount", "remaining", "reserved", "priority", "category", "expires_at")} == {
        "amount": 70,
        "remaining": 70,
        "reserved": 0,
        "priority": 50,
        "category": "paid",
        "expires_at": None,
    }
    [credit_row] = history(client, user_id)
    assert credit_row["grant_id"] == grant_id and funding_of(credit_row) == [(grant_id, 70)]
    assert grant_problems(db, user_id) == []


def test_debits_draw_lowest_priority_then_earliest_expiry_then_oldest_and_span_grants(client, db, user_id):
    paid = grant(client, user_id, 100)  # priority 50, no expiry: spent last
    promo_late = grant(client, user_id, 10, priority=10, category="promotional", expires_at=at(2 * 86400))
    promo_soon = grant(client, user_id, 20, priority=10, category="promotional", expires_at=at(86400))
    same_day = at(86400)
    trial_a = grant(client, user_id, 5, priority=10, expires_at=same_day)
    trial_b = grant(client, user_id, 6, priority=10, expires_at=same_day)  # same key as trial_a, newer
    expiring_paid = grant(client, user_id, 40, expires_at=at(3600))  # priority 50 but it expires: before `paid`
    # promo_soon's expiry was taken a moment before same_day's, so it comes first.
    order = [promo_soon, trial_a, trial_b, promo_late, expiring_paid, paid]
    assert list(remaining(client, user_id)) == order

    assert charge(client, user_id, 22).status_code == 200  # 20 + 2: one debit spans two grants
    assert charge(client, user_id, 24).status_code == 200  # 3 + 6 + 10 + 5
    assert charge(client, user_id, 40).status_code == 200  # 35 + 5
    debits = [row for row in history(client, user_id) if row["type"] == "debit"]
    assert [funding_of(row) for row in debits] == [
        [(promo_soon, 20), (trial_a, 2)],
        [(trial_a, 3), (trial_b, 6), (promo_late, 10), (expiring_paid, 5)],
        [(expiring_paid, 35), (paid, 5)],
    ]
    assert remaining(client, user_id) == {paid: 95}
    balance = client.get(f"/billing/balance/{user_id}?by=category").json()
    assert balance["balance"] == 95 and balance["categories"] == {"paid": 95, "promotional": 0}
    assert grant_problems(db, user_id) == []


def test_holds_reserve_in_the_same_order_and_give_back_to_the_same_grants(client, db, user_id):
    paid = grant(client, user_id, 100)
    trial = grant(client, user_id, 30, priority=10, expires_at=at(86400))
    root = client.post("/billing/holds", json={"user_id": str(user_id), "amount": 50, "description": "run"}).json()
    listed = {item["grant_id"]: item for item in client.get(f"/billing/grants/{user_id}").json()}
    assert (listed[trial]["remaining"], listed[trial]["reserved"]) == (0, 30)
    assert (listed[paid]["remaining"], listed[paid]["reserved"]) == (80, 20)

    # A capture spends the reservation in draw order; an overrun then draws the live grants.
    first = client.post(f"/billing/holds/{root['hold_id']}/capture", json={"amount": 35})
    assert first.status_code == 200, first.text
    last = client.post(
        f"/billing/holds/{root['hold_id']}/capture", json={"amount": 25, "allow_overrun": True, "final": True}
    )
    assert last.status_code == 200, last.text
    captures = [row for row in history(client, user_id) if row["type"] == "capture"]
    assert [funding_of(row) for row in captures] == [[(trial, 30), (paid, 5)], [(paid, 25)]]  # 15 held + 10 overrun
    assert remaining(client, user_id) == {paid: 70}

    # A released tree gives its reservation back to the grants it came from.
    grant(client, user_id, 10, priority=5, expires_at=at(86400))
    other = client.post("/billing/holds", json={"user_id": str(user_id), "amount": 30, "description": "run"}).json()
    child = client.post(f"/billing/holds/{other['hold_id']}/children", json={"amount": 12, "description": "sub"})
    assert client.post(f"/billing/holds/{child.json()['hold_id']}/capture", json={"amount": 4}).status_code == 200
    assert client.post(f"/billing/holds/{other['hold_id']}/release").status_code == 200
    after = client.get(f"/billing/grants/{user_id}").json()
    assert [(item["remaining"], item["reserved"]) for item in after] == [(6, 0), (70, 0)]  # the child took 4
    assert grant_problems(db, user_id) == []


def test_expiry_is_exact_at_the_instant_and_an_expiry_row_explains_the_loss(client, db, user_id):
    grant(client, user_id, 100)
    moment = at(1.5)
    trial = grant(client, user_id, 30, priority=10, category="promotional", expires_at=moment)
    assert charge(client, user_id, 10).status_code == 200  # from the trial
    before = client.get(f"/billing/balance/{user_id}").json()
    assert (before["balance"], before["expiring"]) == (120, 20)
    assert before["next_expiry"] is not None

    wait_until(moment)
    # No waiting for a job: reads stop counting the trial at once, and no debit may spend it.
    now = client.get(f"/billing/balance/{user_id}").json()
    assert (now["balance"], now["available"], now["expiring"], now["next_expiry"]) == (100, 100, 0, None)
    refused = charge(client, user_id, 101)
    assert refused.status_code == 402 and refused.json()["code"] == "insufficient_balance"
    assert charge(client, user_id, 100).status_code == 200

    rows = history(client, user_id)
    expiry = [row for row in rows if row["type"] == "expiry"]
    assert len(expiry) == 1 and expiry[0]["amount"] == -20 and expiry[0]["grant_id"] == trial
    assert funding_of(expiry[0]) == [(trial, 20)]
    assert rows[-1]["type"] == "debit" and rows[-1]["balance_after"] == 0  # the expiry was written first
    balance, ledger_sum, _ = ledger_state(db, user_id)
    assert balance == ledger_sum == 0
    events = db.execute(
        "SELECT data ->> 'grant_id', (data ->> 'expired')::int FROM events"
        " WHERE user_id = %s AND type = 'grant.expired'",
        (user_id,),
    ).fetchall()
    assert events == [(trial, 20)]
    assert grant_problems(db, user_id) == []


def test_a_void_removes_what_is_left_once_and_answers_the_same_again(client, db, user_id):
    grant(client, user_id, 50)
    trial = grant(client, user_id, 40, priority=10, category="promotional")
    assert charge(client, user_id, 15).status_code == 200
    hold = client.post("/billing/holds", json={"user_id": str(user_id), "amount": 10, "description": "run"}).json()

    first = client.post(f"/billing/grants/{trial}/void", json={"description": "trial revoked"})
    assert first.status_code == 200, first.text
    assert first.json()["voided"] == 15 and first.json()["grant"]["voided_at"] is not None
    again = client.post(f"/billing/grants/{trial}/void")
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["voided"] == 0 and again.json()["transaction_id"] is None
    assert client.get(f"/billing/balance/{user_id}").json()["available"] == 50

    # The 10 the hold reserved of the voided trial come back to it on release, and are written off then.
    assert client.post(f"/billing/holds/{hold['hold_id']}/release").status_code == 200
    assert client.get(f"/billing/balance/{user_id}").json()["balance"] == 50
    assert charge(client, user_id, 51).status_code == 402  # the refusal path sweeps the returned tokens
    voids = [row for row in history(client, user_id) if row["type"] == "void"]
    assert [(row["amount"], row["grant_id"]) for row in voids] == [(-15, trial), (-10, trial)]
    balance, ledger_sum, _ = ledger_state(db, user_id)
    assert balance == ledger_sum == 50
    missing = client.post(f"/billing/grants/{uuid.uuid4()}/void")
    assert missing.status_code == 404 and missing.json()["code"] == "grant_not_found"
    assert grant_problems(db, user_id) == []


@pytest.mark.parametrize(
    "terms",
    [
        {"expires_at": "2020-01-01T00:00:00Z"},
        {"expires_at": "2099-01-01T00:00:00"},
        {"expires_at": 4102444800},
        {"expires_at": "next week"},
        {"priority": 101},
        {"priority": -1},
        {"priority": "5"},
        {"priority": 1.5},
        {"category": "gift"},
    ],
)
def test_bad_grant_terms_are_a_clear_422_and_move_nothing(client, db, user_id, terms):
    fund(client, user_id, 5)
    body = {"user_id": str(user_id), "amount": 10, "description": "grant", **terms}
    response = client.post("/billing/credit-tokens", json=body)
    assert response.status_code == 422, response.text
    assert set(response.json()) == {"detail", "code"}
    assert ledger_state(db, user_id) == (5, 5, 1)


def test_a_retried_credit_replays_even_after_its_grant_expired(client, db, user_id):
    moment = at(1.0)
    body = {"user_id": str(user_id), "amount": 25, "description": "trial", "expires_at": moment}
    first = client.post("/billing/credit-tokens", json=body, headers={"Idempotency-Key": "trial-1"})
    assert first.status_code == 200, first.text
    wait_until(moment)
    retry = client.post("/billing/credit-tokens", json=body, headers={"Idempotency-Key": "trial-1"})
    assert retry.status_code == 200 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.json() == first.json()
    fresh = client.post("/billing/credit-tokens", json=body, headers={"Idempotency-Key": "trial-2"})
    assert fresh.status_code == 422 and fresh.json()["code"] == "expires_at_in_past"
    assert client.get(f"/billing/balance/{user_id}").json()["balance"] == 0
    assert ledger_state(db, user_id)[2] == 1


def test_billing_audit_catches_a_corrupted_grant(server, client, db, user_id):
    paid = grant(client, user_id, 60)
    assert charge(client, user_id, 15).status_code == 200
    assert grant_problems(db, user_id) == []

    def audit() -> subprocess.CompletedProcess[str]:
        env = {**server.env, "DATABASE_URL": server.database_url}
        return subprocess.run(
            [sys.executable, "-m", "billing_service", "audit"], env=env, capture_output=True, text=True, timeout=120
        )

    # Seven tokens appear in the grant's slot from nowhere: the balance and the ledger still agree.
    saved = db.execute("SELECT grants::text FROM accounts WHERE user_id = %s", (user_id,)).fetchone()[0]
    db.execute(
        "UPDATE accounts SET grants = (billing_return(grants, user_id, %s::jsonb)).new_slots WHERE user_id = %s",
        (f'[{{"grant_id": "{paid}", "amount": 7}}]', user_id),
    )
    try:
        drift = audit()
        assert drift.returncode == 1, drift.stdout + drift.stderr
        assert f"GRANT DRIFT {user_id}: grants hold 52 but balance - held is 45" in drift.stdout
        assert f"GRANT DRIFT {user_id} grant {paid}: remaining 52 + reserved 0 but its ledger rows moved 45" in (
            drift.stdout
        )
        assert f"DRIFT {user_id}:" not in drift.stdout.replace("GRANT DRIFT", "")  # the ledger itself is fine
    finally:
        db.execute("UPDATE accounts SET grants = %s::billing_grant_slot[] WHERE user_id = %s", (saved, user_id))
    assert grant_problems(db, user_id) == []


def test_the_audit_checks_each_grants_amount_against_the_row_that_brought_it(client, db, user_id):
    paid = grant(client, user_id, 60)
    assert charge(client, user_id, 15).status_code == 200
    assert grant_problems(db, user_id) == []
    # Only the grant's amount changes: it looks partly spent, and every slot and ledger check still agrees.
    db.execute("UPDATE grants SET amount = 70 WHERE id = %s", (paid,))
    # A grant that no ledger row ever brought, empty: its slot and reservations are all zero.
    stray = db.execute(
        "INSERT INTO grants (user_id, amount, priority, category, source) VALUES (%s, 5, 50, 'paid', 'credit')"
        " RETURNING id",
        (user_id,),
    ).fetchone()[0]
    try:
        assert sorted(grant_problems(db, user_id), key=str) == sorted(
            [
                (user_id, uuid.UUID(paid), "its credit row brought 60 but its amount is 70"),
                (user_id, stray, "no credit or refund row brought its amount 5"),
            ],
            key=str,
        )
    finally:
        db.execute("DELETE FROM grants WHERE id = %s", (stray,))
        db.execute("UPDATE grants SET amount = 60 WHERE id = %s", (paid,))
    assert grant_problems(db, user_id) == []


def test_every_write_after_an_expiry_comes_after_its_expiry_row(client, db, user_id):
    grant(client, user_id, 100)
    moment = at(1.0)
    grant(client, user_id, 30, priority=10, expires_at=moment)
    debit = charge(client, user_id, 10).json()["transaction_id"]
    wait_until(moment)
    # A credit and a refund, no debit: neither may post a balance_after that still counts the expired 20.
    assert (
        client.post(
            "/billing/credit-tokens", json={"user_id": str(user_id), "amount": 5, "description": "top-up"}
        ).json()["balance"]
        == 105
    )
    refund = client.post(
        f"/billing/transactions/{debit}/refund", json={"user_id": str(user_id), "amount": 10, "description": "back"}
    )
    assert refund.status_code == 200 and refund.json()["balance"] == 115
    rows = [(row["type"], row["amount"], row["balance_after"]) for row in history(client, user_id)]
    assert rows[-3:] == [("expiry", -20, 100), ("credit", 5, 105), ("refund", 10, 115)]
    assert grant_problems(db, user_id) == []


def test_a_capture_after_an_expiry_comes_after_its_expiry_row(client, db, user_id):
    paid = grant(client, user_id, 100)
    moment = at(1.0)
    grant(client, user_id, 30, priority=10, expires_at=moment)
    hold = client.post("/billing/holds", json={"user_id": str(user_id), "amount": 10, "description": "run"}).json()
    wait_until(moment)
    # The trial grant expired with 20 unreserved (its 10 stay the hold's). The capture finds it due, writes the
    # expiry row first, then spends the reservation and overruns into the paid grant: balance_after is exact.
    captured = client.post(f"/billing/holds/{hold['hold_id']}/capture", json={"amount": 15, "allow_overrun": True})
    assert captured.status_code == 200, captured.text
    assert captured.json()["balance"] == 95
    assert captured.json()["hold"]["captured"] == 15
    rows = [(row["type"], row["amount"], row["balance_after"]) for row in history(client, user_id)]
    assert rows[-2:] == [("expiry", -20, 110), ("capture", -15, 95)]
    assert remaining(client, user_id) == {paid: 95}
    assert grant_problems(db, user_id) == []
