"""AsyncBillingClient against the real server: the same promises as the blocking client."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from billing_client import AccountNotFound, AsyncBillingClient, InsufficientBalance

from .sdk_support import FAST_RETRY, SERVICE_TOKEN, LiveServer, ledger_state


def test_async_client_covers_every_endpoint(server: LiveServer, user_id: uuid.UUID) -> None:
    async def scenario() -> None:
        async with AsyncBillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            with pytest.raises(AccountNotFound):
                await billing.balance(user_id)
            assert (await billing.open_account(user_id)).balance == 0
            await billing.credit(user_id, 100, "grant")
            posted = await billing.charge(user_id, 30, "run", idempotency_key="run-a")
            replay = await billing.charge(user_id, 30, "run", idempotency_key="run-a")
            assert replay.replayed and replay.transaction_id == posted.transaction_id
            with pytest.raises(InsufficientBalance):
                await billing.charge(user_id, 71, "too much")
            assert (await billing.balance(user_id)).balance == 70
            assert (await billing.balance(user_id, by_category=True)).categories == {"paid": 70, "promotional": 0}
            page = await billing.transactions(user_id, limit=1)
            assert page.next_cursor is not None
            amounts = [t.amount async for t in billing.iter_transactions(user_id, page_size=1)]
            assert amounts == [-30, 100]

    asyncio.run(scenario())


def test_concurrent_async_charges_with_one_key_charge_once(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    async def scenario() -> list[bool]:
        async with AsyncBillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            await billing.credit(user_id, 100, "grant")
            results = await asyncio.gather(
                *(billing.charge(user_id, 10, "run", idempotency_key="run-x") for _ in range(8)),
                return_exceptions=True,
            )
        # A twin still in flight is a 409 (IdempotencyConflict); everything else is the one charge, replayed.
        return [r.replayed for r in results if not isinstance(r, BaseException)]

    replays = asyncio.run(scenario())
    assert replays.count(False) <= 1
    assert ledger_state(db, user_id) == (90, 90, 2)
