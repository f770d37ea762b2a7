"""Holds through the client, and `reserve`: capture what a run uses, release the rest however it ends."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from billing_client import (
    AsyncBillingClient,
    BillingClient,
    HoldLimitExceeded,
    HoldNotActive,
    HoldNotFound,
    InsufficientBalance,
)

from .sdk_support import FAST_RETRY, SERVICE_TOKEN, LiveServer, ledger_state


def test_reserve_captures_what_the_run_uses_and_releases_the_rest(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 1000, "grant")
    with billing.reserve(user_id, 500, "agent run 42", metadata={"run_id": "42"}) as run:
        assert billing.balance(user_id).available == 500
        run.capture(100, metadata={"step": 1})
        run.capture(50, metadata={"step": 2})
        assert run.hold.remaining == 350
        during = billing.balance(user_id)
        assert (during.balance, during.held, during.available) == (850, 350, 500)

    after = billing.balance(user_id)
    assert (after.balance, after.held, after.available) == (850, 0, 850)
    assert billing.get_hold(run.hold.hold_id).status == "released"
    captures = [t for t in billing.iter_transactions(user_id) if t.type == "capture"]
    assert [(t.amount, t.hold_id) for t in captures] == [(-50, run.hold.hold_id), (-100, run.hold.hold_id)]
    assert ledger_state(db, user_id) == (850, 850, 3)


def test_reserve_releases_the_hold_when_the_run_fails(billing: BillingClient, user_id: uuid.UUID) -> None:
    billing.credit(user_id, 100, "grant")
    with pytest.raises(RuntimeError, match="agent crashed"), billing.reserve(user_id, 80, "run") as run:
        run.capture(10)
        raise RuntimeError("agent crashed")
    account = billing.balance(user_id)
    assert (account.balance, account.held, account.available) == (90, 0, 90)
    assert billing.list_holds(user_id, status="active") == []


def test_reserve_is_refused_when_the_available_balance_is_short(billing: BillingClient, user_id: uuid.UUID) -> None:
    billing.credit(user_id, 10, "grant")
    with pytest.raises(InsufficientBalance), billing.reserve(user_id, 11, "too big"):
        pytest.fail("the block must not run without a hold")
    assert billing.balance(user_id).held == 0


def test_hold_errors_are_typed(billing: BillingClient, user_id: uuid.UUID) -> None:
    billing.credit(user_id, 100, "grant")
    hold = billing.create_hold(user_id, 40, "run", ttl_seconds=60)
    child = billing.carve_child(hold.hold_id, 15, "sub-agent")
    assert (child.parent_id, child.remaining) == (hold.hold_id, 15)
    assert billing.extend(hold.hold_id, 120).expires_at >= hold.expires_at

    with pytest.raises(HoldLimitExceeded) as too_much:
        billing.capture(child.hold_id, 16)
    assert (too_much.value.status, too_much.value.code) == (409, "capture_exceeds_hold")

    final = billing.capture(hold.hold_id, 5, final=True)
    assert final.hold.status == "captured" and final.balance == 95
    with pytest.raises(HoldNotActive):
        billing.release(hold.hold_id)
    with pytest.raises(HoldNotFound):
        billing.get_hold(uuid.uuid4())


def test_async_reserve_behaves_the_same(server: LiveServer, user_id: uuid.UUID) -> None:
    async def scenario() -> tuple[int, int | None]:
        async with AsyncBillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            await billing.credit(user_id, 100, "grant")
            with pytest.raises(ValueError):
                async with billing.reserve(user_id, 60, "run") as run:
                    await run.capture(25)
                    raise ValueError("tool call failed")
            account = await billing.balance(user_id)
            return account.balance, account.held

    assert asyncio.run(scenario()) == (75, 0)
