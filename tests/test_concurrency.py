"""The money invariants under real concurrency: many HTTP clients, a 2-worker server, one account."""

from __future__ import annotations

import asyncio

import httpx

from conftest import fund, ledger_state


async def _parallel(server, requests):
    """Send every request at once, each on its own connection, so the workers really interleave."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with server.async_client(limits=limits) as http:
        return await asyncio.gather(*(http.post(path, json=body) for path, body in requests))


def test_200_parallel_charges_against_a_balance_of_50_give_exactly_50_successes(server, client, db, user_id):
    fund(client, user_id, 50)
    body = {"user_id": str(user_id), "amount": 1, "description": "parallel"}
    responses = asyncio.run(_parallel(server, [("/billing/charge-tokens", body)] * 200))

    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 50, {status: statuses.count(status) for status in set(statuses)}
    assert statuses.count(402) == 150
    assert {r.json()["code"] for r in responses if r.status_code == 402} == {"insufficient_balance"}
    # Every success saw a different balance: no two debits were applied to the same funds.
    assert sorted(r.json()["balance"] for r in responses if r.status_code == 200) == list(range(50))
    balance = client.get(f"/billing/balance/{user_id}").json()["balance"]
    assert balance == 0
    assert ledger_state(db, user_id) == (0, 0, 51)
    history = client.get(f"/billing/transactions/{user_id}").json()
    assert sum(item["amount"] for item in history) == balance


def test_parallel_credits_and_charges_keep_the_balance_equal_to_the_ledger(server, client, db, user_id):
    fund(client, user_id, 100)
    charge = ("/billing/charge-tokens", {"user_id": str(user_id), "amount": 3, "description": "use"})
    credit = ("/billing/credit-tokens", {"user_id": str(user_id), "amount": 2, "description": "refill"})
    responses = asyncio.run(_parallel(server, [charge, credit] * 60))

    assert {response.status_code for response in responses} <= {200, 402}
    charged = sum(
        1
        for (path, _), r in zip([charge, credit] * 60, responses, strict=True)
        if r.status_code == 200 and path == charge[0]
    )
    assert all(r.status_code == 200 for r in responses[1::2]), "a credit failed"
    expected = 100 + 60 * 2 - charged * 3
    balance, total, count = ledger_state(db, user_id)
    assert balance == total == expected >= 0
    assert count == 1 + 60 + charged
    rows = db.execute(
        "SELECT seq, amount, balance_after FROM transactions WHERE user_id = %s ORDER BY seq", (user_id,)
    ).fetchall()
    # The balance_after chain is unbroken: each row's balance follows from the one before it.
    previous = 0
    for seq, amount, balance_after in rows:
        assert balance_after == previous + amount >= 0, seq
        previous = balance_after
