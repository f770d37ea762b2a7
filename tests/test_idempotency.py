"""Idempotency-Key on every POST: a retry never posts twice, even when the duplicates race."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

from conftest import fund, ledger_state

WRITES = ["/billing/charge-tokens", "/billing/credit-tokens"]


def post(client, path, user_id, amount, key, description="run"):
    return client.post(
        path,
        json={"user_id": str(user_id), "amount": amount, "description": description},
        headers={"Idempotency-Key": key},
    )


@pytest.mark.parametrize("path", WRITES)
def test_a_replay_returns_the_original_body_marked_replayed(client, db, user_id, path):
    fund(client, user_id, 100)
    first = post(client, path, user_id, 10, "k-1")
    assert first.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    replay = post(client, path, user_id, 10, "k-1")
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    assert ledger_state(db, user_id)[2] == 2


def test_a_replay_returns_the_balance_of_its_own_moment(client, db, user_id):
    fund(client, user_id, 100)
    first = post(client, "/billing/charge-tokens", user_id, 10, "k-early")
    post(client, "/billing/charge-tokens", user_id, 20, "k-later")
    replay = post(client, "/billing/charge-tokens", user_id, 10, "k-early")
    assert replay.json() == first.json() == {**first.json(), "balance": 90}
    assert ledger_state(db, user_id) == (70, 70, 3)


@pytest.mark.parametrize(
    "change",
    [{"amount": 11}, {"description": "another run"}, {"metadata": {"run": "x"}}],
    ids=["amount", "description", "metadata"],
)
@pytest.mark.parametrize("path", WRITES)
def test_the_same_key_with_a_different_body_is_422_and_moves_nothing(client, db, user_id, path, change):
    fund(client, user_id, 100)
    body = {"user_id": str(user_id), "amount": 10, "description": "run"}
    assert client.post(path, json=body, headers={"Idempotency-Key": "k"}).status_code == 200
    before = ledger_state(db, user_id)
    reused = client.post(path, json={**body, **change}, headers={"Idempotency-Key": "k"})
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"
    assert ledger_state(db, user_id) == before


def test_a_charge_key_reused_for_a_credit_is_422(client, db, user_id):
    fund(client, user_id, 100)
    assert post(client, "/billing/charge-tokens", user_id, 10, "k").status_code == 200
    reused = post(client, "/billing/credit-tokens", user_id, 10, "k")
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"
    assert ledger_state(db, user_id) == (90, 90, 2)


def test_keys_are_scoped_per_user(client, db):
    alice, bob = uuid.uuid4(), uuid.uuid4()
    fund(client, alice, 50)
    fund(client, bob, 50)
    for who in (alice, bob):
        response = post(client, "/billing/charge-tokens", who, 5, "shared-key")
        assert response.status_code == 200
        assert "Idempotent-Replayed" not in response.headers
        assert ledger_state(db, who) == (45, 45, 2)


def test_a_refused_charge_leaves_no_key_so_a_retry_runs_afresh(client, db, user_id):
    fund(client, user_id, 5)
    refused = post(client, "/billing/charge-tokens", user_id, 10, "k-retry")
    assert refused.status_code == 402
    assert db.execute("SELECT count(*) FROM transactions WHERE idempotency_key = 'k-retry'").fetchone() == (0,)
    fund(client, user_id, 10)
    retry = post(client, "/billing/charge-tokens", user_id, 10, "k-retry")
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.json()["balance"] == 5
    assert ledger_state(db, user_id) == (5, 5, 3)


def test_a_charge_of_an_unknown_user_leaves_no_key(client, db, user_id):
    assert post(client, "/billing/charge-tokens", user_id, 1, "k-ghost").status_code == 402
    fund(client, user_id, 1)
    retry = post(client, "/billing/charge-tokens", user_id, 1, "k-ghost")
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers


def test_a_key_of_255_characters_works_and_256_is_422(client, db, user_id):
    fund(client, user_id, 10)
    assert post(client, "/billing/charge-tokens", user_id, 1, "k" * 255).status_code == 200
    too_long = post(client, "/billing/charge-tokens", user_id, 1, "k" * 256)
    assert too_long.status_code == 422
    assert too_long.json()["code"] == "validation_error"
    assert ledger_state(db, user_id) == (9, 9, 2)


def _race(server, path, user_id, amount, key, copies):
    async def main():
        async with server.async_client() as http:
            return await asyncio.gather(*(post(http, path, user_id, amount, key) for _ in range(copies)))

    return asyncio.run(main())


def _assert_one_transaction_and_replays(responses, db, user_id, expected_count):
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 409}, [(r.status_code, r.text) for r in responses]
    winners = [r for r in responses if r.status_code == 200 and "Idempotent-Replayed" not in r.headers]
    assert len(winners) == 1, statuses
    for response in responses:
        if response.status_code == 200:
            assert response.json() == winners[0].json()
        else:
            assert response.json()["code"] == "idempotency_conflict"
    balance, total, count = ledger_state(db, user_id)
    assert balance == total and count == expected_count


@pytest.mark.parametrize("path", WRITES)
def test_concurrent_duplicates_make_exactly_one_transaction(server, db, client, user_id, path):
    fund(client, user_id, 100)
    responses = _race(server, path, user_id, 7, "k-race", copies=20)
    _assert_one_transaction_and_replays(responses, db, user_id, expected_count=2)


def test_concurrent_duplicates_opening_an_account_by_credit(server, db, user_id):
    responses = _race(server, "/billing/credit-tokens", user_id, 7, "k-open", copies=20)
    _assert_one_transaction_and_replays(responses, db, user_id, expected_count=1)
    assert ledger_state(db, user_id) == (7, 7, 1)


def test_duplicates_queued_on_the_row_lock_replay_even_when_the_winner_took_the_whole_balance(
    server, db, client, user_id
):
    # Forces the race deterministically: every duplicate starts its statement (and so its snapshot, in
    # which the key does not exist yet) while the account row is locked, then queues on that lock.
    # When the winner has emptied the balance, the losers must answer with its replay, not a 402.
    fund(client, user_id, 10)
    copies = 4
    results = []

    def duplicate():
        with server.client() as http:
            results.append(post(http, "/billing/charge-tokens", user_id, 10, "k"))

    with db.transaction():
        db.execute("SELECT 1 FROM accounts WHERE user_id = %s FOR UPDATE", (user_id,))
        threads = [threading.Thread(target=duplicate) for _ in range(copies)]
        for thread in threads:
            thread.start()
        # Every duplicate queues on the lock, unless the server coalesces them first (BILLING_BATCH_CHARGES
        # sends one batch per worker): then settle for what queued within a grace period.
        deadline, grace_ends = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            waiting = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0]
            if waiting >= copies or (grace_ends is not None and time.monotonic() > grace_ends):
                break
            if waiting and grace_ends is None:
                grace_ends = time.monotonic() + 2
            time.sleep(0.05)
        else:
            pytest.fail("the duplicates never queued on the account's row lock")
    for thread in threads:
        thread.join()
    _assert_one_transaction_and_replays(results, db, user_id, expected_count=2)
    assert ledger_state(db, user_id) == (0, 0, 2)
