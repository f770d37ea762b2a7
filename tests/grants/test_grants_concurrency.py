"""200 parallel charges against one account with 5 grants, two of them expiring during the run."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime

from conftest import ledger_state
from grants.helpers import at, grant, grant_problems, wait_until


def test_parallel_charges_and_expiries_reconcile_and_no_token_is_spent_after_its_expiry(server, db, user_id):
    # The charges (about 5.5 tokens every 10 ms) cannot empty either expiring grant before it expires.
    first_expiry, second_expiry = at(0.6), at(1.3)
    with server.client() as client:
        grants = {
            grant(client, user_id, 600, priority=10, category="promotional", expires_at=first_expiry): 600,
            grant(client, user_id, 600, priority=20, category="promotional", expires_at=second_expiry): 600,
            grant(client, user_id, 300, priority=30, expires_at=at(3600)): 300,
            grant(client, user_id, 300): 300,
            grant(client, user_id, 300, priority=60): 300,
        }
    amounts = [random.randint(1, 10) for _ in range(200)]

    async def one(http, amount: int, delay: float) -> int:
        await asyncio.sleep(delay)
        response = await http.post(
            "/billing/charge-tokens", json={"user_id": str(user_id), "amount": amount, "description": "step"}
        )
        assert response.status_code in (200, 402), response.text
        return response.status_code

    async def run() -> list[int]:
        # Spread over ~2 s, so both expiries land in the middle of the load.
        async with server.async_client() as http:
            return await asyncio.gather(*(one(http, amount, n * 0.01) for n, amount in enumerate(amounts)))

    statuses = asyncio.run(run())
    wait_until(second_expiry)
    with server.client() as client:
        # A refused write sweeps what is due: every expiry row is written after it.
        assert (
            client.post(
                "/billing/charge-tokens", json={"user_id": str(user_id), "amount": 10**12, "description": "sweep"}
            ).status_code
            == 402
        )

    rows = db.execute(
        "SELECT type, amount, funding, grant_id, created_at FROM transactions WHERE user_id = %s ORDER BY seq",
        (user_id,),
    ).fetchall()
    debits = [row for row in rows if row[0] == "debit"]
    assert len(debits) == statuses.count(200) > 0
    assert sorted(-row[1] for row in debits) == sorted(a for a, s in zip(amounts, statuses, strict=True) if s == 200)

    expires = {
        str(grant_id): expires_at
        for grant_id, expires_at in db.execute("SELECT id, expires_at FROM grants WHERE user_id = %s", (user_id,))
    }
    drawn = dict.fromkeys(grants, 0)
    for _, amount, funding, _, created_at in debits:
        assert sum(entry["amount"] for entry in funding) == -amount  # every token of a debit came from a grant
        for entry in funding:
            expires_at = expires[entry["grant_id"]]
            # Stamped with the instant it was decided: never at or after its grant's expiry.
            assert expires_at is None or created_at < expires_at, (entry, created_at, expires_at)
            drawn[entry["grant_id"]] += entry["amount"]
    expired = {str(row[3]): -row[1] for row in rows if row[0] == "expiry"}
    left = dict(
        db.execute(
            "SELECT s.grant_id::text, s.remaining FROM accounts a CROSS JOIN unnest(a.grants) s WHERE a.user_id = %s",
            (user_id,),
        ).fetchall()
    )
    for grant_id, amount in grants.items():
        # credited = drawn + written off at expiry + still there, and nothing went below zero
        assert amount == drawn[grant_id] + expired.get(grant_id, 0) + left.get(grant_id, 0), grant_id
        assert drawn[grant_id] <= amount
    expiring = [g for g, moment in expires.items() if moment is not None and moment <= datetime.now(moment.tzinfo)]
    assert set(expired) == set(expiring) and len(expiring) == 2 and all(expired.values())
    balance, ledger_sum, _ = ledger_state(db, user_id)
    assert balance == ledger_sum == sum(left.values())
    assert grant_problems(db, user_id) == []
