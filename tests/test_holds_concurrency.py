"""Holds under concurrency, over HTTP against the 2-worker server: nothing ever overspends.

Each test fires its requests at once from one event loop, then checks the tables themselves: the ledger
sum equals the balance, `held` equals what active holds reserve, and available never went below 0 (the
held_within_balance CHECK would have refused any statement that tried).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx

import test_holds
from conftest import fund, ledger_state
from test_holds import hold


def run(coroutine):
    return asyncio.run(coroutine)


async def post_all(server, requests):
    async with server.async_client(limits=httpx.Limits(max_connections=64)) as http:
        return await asyncio.gather(*(http.post(path, json=body) for path, body in requests))


def assert_books_balance(db, user_id):
    stored, total, _ = ledger_state(db, user_id)
    assert stored == total
    held, active = db.execute(
        "SELECT a.held, (SELECT coalesce(sum(remaining), 0) FROM holds WHERE user_id = a.user_id AND status = 'active')"
        " FROM accounts a WHERE a.user_id = %s",
        (user_id,),
    ).fetchone()
    assert held == active
    assert stored - held >= 0


def assert_audit_clean(server):
    env = {**server.env, "DATABASE_URL": server.database_url}
    result = subprocess.run(
        [sys.executable, "-m", "billing_service", "audit"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_concurrent_captures_never_exceed_the_hold(server, client, db, user_id):
    fund(client, user_id, 1000)
    hold_id = hold(client, user_id, 100)["hold_id"]
    responses = run(post_all(server, [(f"/billing/holds/{hold_id}/capture", {"amount": 7})] * 30))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 14 + [409] * 16
    assert {response.json()["code"] for response in responses if response.status_code == 409} == {
        "capture_exceeds_hold"
    }
    assert client.get(f"/billing/holds/{hold_id}").json()["remaining"] == 2
    assert ledger_state(db, user_id)[0] == 1000 - 98
    assert_books_balance(db, user_id)


def test_a_capture_racing_a_release_is_one_or_the_other(server, client, db, user_id):
    fund(client, user_id, 10_000)
    hold_ids = [hold(client, user_id, 50)["hold_id"] for _ in range(20)]
    requests = []
    for hold_id in hold_ids:
        requests += [(f"/billing/holds/{hold_id}/capture", {"amount": 30}), (f"/billing/holds/{hold_id}/release", {})]
    responses = run(post_all(server, requests))
    captured = 0
    for capture, release in zip(responses[::2], responses[1::2], strict=True):
        assert release.status_code == 200, release.text
        assert capture.status_code in (200, 409), capture.text
        if capture.status_code == 200:
            captured += 30
        else:
            assert capture.json()["code"] == "hold_not_active"
    assert ledger_state(db, user_id)[0] == 10_000 - captured
    assert db.execute("SELECT held FROM accounts WHERE user_id = %s", (user_id,)).fetchone()[0] == 0
    assert_books_balance(db, user_id)


def test_a_capture_racing_expiry_never_takes_expired_tokens(server, client, db, user_id):
    fund(client, user_id, 1_000_000)
    hold_id = hold(client, user_id, 100_000, ttl_seconds=2)["hold_id"]

    async def capture_until_refused():
        async with server.async_client() as http:
            accepted = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                response = await http.post(f"/billing/holds/{hold_id}/capture", json={"amount": 1})
                if response.status_code == 200:
                    accepted += 1
                    continue
                assert response.json()["code"] == "hold_not_active", response.text
                return accepted
            raise AssertionError("the hold never expired")

    async def charge_the_rest_once_expired():
        async with server.async_client() as http:
            await asyncio.sleep(2.5)
            # The rest of the balance becomes available exactly when the hold expires, swept or not.
            available = (await http.get(f"/billing/balance/{user_id}")).json()["available"]
            return available

    async def race():
        return await asyncio.gather(*(capture_until_refused() for _ in range(4)), charge_the_rest_once_expired())

    *accepted, available_after_expiry = run(race())
    captured = sum(accepted)
    assert 0 < captured <= 100_000
    balance_now = ledger_state(db, user_id)[0]
    assert balance_now == 1_000_000 - captured
    assert available_after_expiry == balance_now
    tree = client.get(f"/billing/holds/{hold_id}").json()
    assert tree["status"] == "expired"
    assert tree["captured"] == captured
    assert_books_balance(db, user_id)


def test_parallel_children_never_exceed_the_parent(server, client, db, user_id):
    fund(client, user_id, 1000)
    parent_id = hold(client, user_id, 100)["hold_id"]
    body = {"amount": 15, "description": "sub-agent"}
    responses = run(post_all(server, [(f"/billing/holds/{parent_id}/children", body)] * 20))
    created = [response for response in responses if response.status_code == 201]
    refused = [response for response in responses if response.status_code != 201]
    assert len(created) == 6
    assert {response.json()["code"] for response in refused} == {"child_exceeds_parent"}
    tree = client.get(f"/billing/holds/{parent_id}").json()
    assert tree["remaining"] == 10
    assert sum(node["amount"] for node in tree["children"]) == 90
    assert_books_balance(db, user_id)


def test_charges_racing_holds_never_take_available_below_zero(server, client, db, user_id):
    fund(client, user_id, 1000)
    requests = []
    for _ in range(30):
        requests.append(("/billing/holds", {"user_id": str(user_id), "amount": 50, "description": "run"}))
        requests.append(("/billing/charge-tokens", {"user_id": str(user_id), "amount": 50, "description": "call"}))
    responses = run(post_all(server, requests))
    holds_made = sum(1 for response in responses[::2] if response.status_code == 201)
    charges_made = sum(1 for response in responses[1::2] if response.status_code == 200)
    refused = [response for response in responses if response.status_code not in (200, 201)]
    assert {response.json()["code"] for response in refused} == {"insufficient_balance"}
    assert holds_made + charges_made == 20  # exactly what 1000 covers: no overspend, no spurious refusal
    balance = test_holds.balance(client, user_id)
    assert balance == {
        "user_id": str(user_id),
        "balance": 1000 - 50 * charges_made,
        "held": 50 * holds_made,
        "available": 0,
    }
    assert_books_balance(db, user_id)


def test_mixed_hold_traffic_leaves_the_books_exact(server, client, db, user_id):
    """Captures, children, releases and charges on one account at once; then the audit must be clean."""
    fund(client, user_id, 5000)
    parents = [hold(client, user_id, 400)["hold_id"] for _ in range(5)]
    children = [
        client.post(f"/billing/holds/{parent}/children", json={"amount": 100, "description": "sub"}).json()["hold_id"]
        for parent in parents
    ]
    requests = []
    for parent, sub in zip(parents, children, strict=True):
        requests += [
            (f"/billing/holds/{sub}/capture", {"amount": 60}),
            (f"/billing/holds/{parent}/children", {"amount": 150, "description": "sub"}),
            (f"/billing/holds/{sub}/capture", {"amount": 60}),
            (f"/billing/holds/{parent}/capture", {"amount": 100}),
            (f"/billing/holds/{parent}/release", {}),
            ("/billing/charge-tokens", {"user_id": str(user_id), "amount": 300, "description": "x"}),
        ]
    responses = run(post_all(server, requests))
    assert all(response.status_code in (200, 201, 402, 409) for response in responses), [
        response.text for response in responses if response.status_code not in (200, 201, 402, 409)
    ]
    assert db.execute("SELECT held FROM accounts WHERE user_id = %s", (user_id,)).fetchone()[0] == 0
    assert_books_balance(db, user_id)
    assert_audit_clean(server)


def test_concurrent_retries_with_one_key_make_one_hold_and_one_capture(server, client, db, user_id):
    fund(client, user_id, 1000)

    async def race(path, body, key, copies=12):
        async with server.async_client() as http:
            return await asyncio.gather(
                *(http.post(path, json=body, headers={"Idempotency-Key": key}) for _ in range(copies))
            )

    body = {"user_id": str(user_id), "amount": 100, "description": "run"}
    created = run(race("/billing/holds", body, "hold-race"))
    assert {response.status_code for response in created} <= {201, 409}, [r.text for r in created]
    hold_ids = {response.json()["hold_id"] for response in created if response.status_code == 201}
    assert len(hold_ids) == 1
    (hold_id,) = hold_ids
    captured = run(race(f"/billing/holds/{hold_id}/capture", {"amount": 30}, "capture-race"))
    assert {response.status_code for response in captured} <= {200, 409}, [r.text for r in captured]
    assert len({response.json()["transaction_id"] for response in captured if response.status_code == 200}) == 1
    assert ledger_state(db, user_id) == (970, 970, 2)
    assert client.get(f"/billing/holds/{hold_id}").json()["remaining"] == 70
    assert_books_balance(db, user_id)
