"""Nested run budgets: child holds carved out of a parent hold."""

from __future__ import annotations

import time
from datetime import datetime

from conftest import fund, ledger_state
from test_holds import balance, held_column, hold


def child(client, parent_id, amount, **extra):
    body = {"amount": amount, "description": "sub-agent", **extra}
    response = client.post(f"/billing/holds/{parent_id}/children", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def capture(client, hold_id, amount, **extra):
    response = client.post(f"/billing/holds/{hold_id}/capture", json={"amount": amount, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_child_is_carved_from_the_parent_without_touching_available(client, db, user_id):
    fund(client, user_id, 100)
    parent = hold(client, user_id, 60)
    sub = child(client, parent["hold_id"], 25)
    assert sub["parent_id"] == parent["hold_id"]
    assert sub["depth"] == 2
    assert sub["remaining"] == 25
    assert client.get(f"/billing/holds/{parent['hold_id']}").json()["remaining"] == 35
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 100, "held": 60, "available": 40}


def test_a_child_capture_debits_the_user_and_comes_out_of_the_parent_budget(client, db, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 60)["hold_id"]
    sub_id = child(client, parent_id, 25)["hold_id"]
    captured = capture(client, sub_id, 10)
    assert captured["balance"] == 90
    assert captured["hold"]["remaining"] == 15
    capture(client, parent_id, 5)
    tree = client.get(f"/billing/holds/{parent_id}").json()
    assert tree["captured"] == 5
    assert tree["subtree_captured"] == 15
    assert tree["remaining"] == 30
    assert tree["subtree_remaining"] == 45  # 60 reserved - 15 captured
    assert [node["captured"] for node in tree["children"]] == [10]
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 85, "held": 45, "available": 40}
    assert ledger_state(db, user_id) == (85, 85, 3)


def test_children_never_exceed_the_parents_remaining(client, db, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 50)["hold_id"]
    child(client, parent_id, 30)
    response = client.post(f"/billing/holds/{parent_id}/children", json={"amount": 21, "description": "x"})
    assert response.status_code == 409
    assert response.json()["code"] == "child_exceeds_parent"
    child(client, parent_id, 20)
    assert client.get(f"/billing/holds/{parent_id}").json()["remaining"] == 0
    assert held_column(db, user_id) == 50


def test_a_child_capture_is_bounded_by_the_child_not_the_parent(client, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 50)["hold_id"]
    sub_id = child(client, parent_id, 10)["hold_id"]
    response = client.post(f"/billing/holds/{sub_id}/capture", json={"amount": 11})
    assert response.status_code == 409
    assert response.json()["code"] == "capture_exceeds_hold"


def test_releasing_a_child_gives_its_rest_back_to_the_parent(client, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 50)["hold_id"]
    sub_id = child(client, parent_id, 20)["hold_id"]
    capture(client, sub_id, 5)
    released = client.post(f"/billing/holds/{sub_id}/release")
    assert released.json()["status"] == "released"
    assert client.get(f"/billing/holds/{parent_id}").json()["remaining"] == 45
    assert balance(client, user_id)["held"] == 45


def test_a_final_child_capture_gives_its_rest_back_to_the_parent(client, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 50)["hold_id"]
    sub_id = child(client, parent_id, 20)["hold_id"]
    assert capture(client, sub_id, 5, final=True)["hold"]["status"] == "captured"
    assert client.get(f"/billing/holds/{parent_id}").json()["remaining"] == 45


def test_releasing_a_parent_releases_its_whole_subtree(client, db, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 60)["hold_id"]
    sub_id = child(client, parent_id, 30)["hold_id"]
    grandchild_id = child(client, sub_id, 10)["hold_id"]
    capture(client, grandchild_id, 4)
    client.post(f"/billing/holds/{parent_id}/release")
    tree = client.get(f"/billing/holds/{parent_id}").json()
    statuses = [tree["status"], tree["children"][0]["status"], tree["children"][0]["children"][0]["status"]]
    assert statuses == ["released"] * 3
    assert tree["subtree_captured"] == 4
    response = client.post(f"/billing/holds/{grandchild_id}/capture", json={"amount": 1})
    assert response.json()["code"] == "hold_not_active"
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 96, "held": 0, "available": 96}


def test_a_final_capture_on_a_parent_closes_its_children(client, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 60)["hold_id"]
    sub_id = child(client, parent_id, 30)["hold_id"]
    capture(client, parent_id, 10, final=True)
    assert client.get(f"/billing/holds/{sub_id}").json()["status"] == "released"
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 90, "held": 0, "available": 90}


def test_children_never_outlive_their_parent(client, user_id):
    fund(client, user_id, 100)
    parent = hold(client, user_id, 60, ttl_seconds=60)
    sub = child(client, parent["hold_id"], 10, ttl_seconds=3600)
    assert sub["expires_at"] == parent["expires_at"]
    extended = client.post(f"/billing/holds/{sub['hold_id']}/extend", json={"ttl_seconds": 7200}).json()
    assert extended["expires_at"] == parent["expires_at"]
    longer_parent = client.post(f"/billing/holds/{parent['hold_id']}/extend", json={"ttl_seconds": 7200}).json()
    extended = client.post(f"/billing/holds/{sub['hold_id']}/extend", json={"ttl_seconds": 3600}).json()
    assert datetime.fromisoformat(parent["expires_at"]) < datetime.fromisoformat(extended["expires_at"])
    assert datetime.fromisoformat(extended["expires_at"]) <= datetime.fromisoformat(longer_parent["expires_at"])


def test_expiry_of_a_parent_expires_its_children_and_frees_everything(client, db, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 60, ttl_seconds=1)["hold_id"]
    sub_id = child(client, parent_id, 30)["hold_id"]
    time.sleep(1.3)
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 100, "held": 0, "available": 100}
    response = client.post(f"/billing/holds/{sub_id}/capture", json={"amount": 1})
    assert response.json()["code"] == "hold_not_active"
    tree = client.get(f"/billing/holds/{parent_id}").json()
    assert [tree["status"], tree["children"][0]["status"]] == ["expired", "expired"]
    assert held_column(db, user_id) == 0  # the capture attempt swept the tree under its lock


def test_an_expired_child_gives_its_rest_back_to_a_live_parent(client, db, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 60, ttl_seconds=600)["hold_id"]
    sub_id = child(client, parent_id, 40, ttl_seconds=1)["hold_id"]
    capture(client, sub_id, 15)
    time.sleep(1.3)
    # The parent may now capture what the expired child did not use.
    capture(client, parent_id, 45)
    assert client.get(f"/billing/holds/{sub_id}").json()["status"] == "expired"
    assert balance(client, user_id) == {"user_id": str(user_id), "balance": 40, "held": 0, "available": 40}


def test_depth_is_limited_to_eight_levels(client, user_id):
    fund(client, user_id, 100)
    hold_id = hold(client, user_id, 80)["hold_id"]
    for depth in range(2, 9):
        created = child(client, hold_id, 80 - depth)
        assert created["depth"] == depth
        hold_id = created["hold_id"]
    response = client.post(f"/billing/holds/{hold_id}/children", json={"amount": 1, "description": "too deep"})
    assert response.status_code == 409
    assert response.json()["code"] == "hold_depth_limit"


def test_child_creation_is_idempotent_with_a_key(client, user_id):
    fund(client, user_id, 100)
    parent_id = hold(client, user_id, 50)["hold_id"]
    headers = {"Idempotency-Key": "child-1"}
    body = {"amount": 10, "description": "sub"}
    first = client.post(f"/billing/holds/{parent_id}/children", json=body, headers=headers)
    second = client.post(f"/billing/holds/{parent_id}/children", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["hold_id"] == second.json()["hold_id"]
    assert client.get(f"/billing/holds/{parent_id}").json()["remaining"] == 40
    reused = client.post(f"/billing/holds/{parent_id}/children", json={**body, "amount": 11}, headers=headers)
    assert reused.json()["code"] == "idempotency_key_reused"
