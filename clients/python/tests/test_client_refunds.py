"""Refunds through the client: partial and full, never more than the charge, idempotent, typed refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from billing_client import (
    AsyncBillingClient,
    BillingClient,
    BillingError,
    Funding,
    NotRefundable,
    RefundExceedsCharge,
    TransactionNotFound,
)

from .sdk_support import FAST_RETRY, SERVICE_TOKEN, DroppingProxy, LiveServer, ledger_state


def test_a_partial_then_a_full_refund_give_back_the_whole_charge(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 100, "bought")
    charge = billing.charge(user_id, 40, "run 7", metadata={"run_id": "7"})

    part = billing.refund(charge.transaction_id, user_id=user_id, amount=15, description="failed model call")
    rest = billing.refund(charge.transaction_id, user_id=user_id, description="run cancelled")  # all not refunded

    assert (part.refund_of, part.amount, part.balance, part.refunded_total) == (charge.transaction_id, 15, 75, 15)
    assert (rest.refund_of, rest.amount, rest.balance, rest.refunded_total) == (charge.transaction_id, 25, 100, 40)
    assert not part.replayed and part.transaction_id != rest.transaction_id
    assert ledger_state(db, user_id) == (100, 100, 4)
    newest = billing.transactions(user_id, limit=1).transactions[0]
    assert (newest.id, newest.type, newest.amount, newest.refund_of) == (
        rest.transaction_id,
        "refund",
        25,
        charge.transaction_id,
    )


def test_a_refund_goes_back_to_the_grants_that_paid_last_drawn_first(
    billing: BillingClient, user_id: uuid.UUID
) -> None:
    bought = billing.credit(user_id, 100, "bought").grant_id
    trial = billing.credit(user_id, 30, "trial", priority=10, category="promotional").grant_id
    assert bought is not None and trial is not None
    charge = billing.charge(user_id, 40, "run")  # 30 from the trial, then 10 bought

    refund = billing.refund(charge.transaction_id, user_id=user_id, amount=15, description="failed call")

    row = billing.transactions(user_id, limit=1).transactions[0]
    assert row.id == refund.transaction_id
    assert row.funding == [Funding(bought, 10), Funding(trial, 5)]


def test_refunding_more_than_is_left_raises_refund_exceeds_charge_and_moves_nothing(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 100, "bought")
    charge = billing.charge(user_id, 40, "run")
    billing.refund(charge.transaction_id, user_id=user_id, amount=30, description="most of it")

    with pytest.raises(RefundExceedsCharge) as refused:
        billing.refund(charge.transaction_id, user_id=user_id, amount=11, description="one too many")
    assert (refused.value.status, refused.value.code) == (409, "refund_exceeds_charge")
    assert isinstance(refused.value, BillingError)
    assert ledger_state(db, user_id) == (90, 90, 3)


def test_the_same_key_refunds_once_and_replays(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 100, "bought")
    charge = billing.charge(user_id, 40, "run")

    first = billing.refund(charge.transaction_id, user_id=user_id, amount=10, description="x", idempotency_key="rf-1")
    again = billing.refund(charge.transaction_id, user_id=user_id, amount=10, description="x", idempotency_key="rf-1")

    assert again.replayed and not first.replayed
    assert again == dataclasses.replace(first, replayed=True)
    assert ledger_state(db, user_id) == (70, 70, 3)


def test_a_refund_whose_response_was_lost_is_retried_with_its_generated_key_and_refunds_once(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN) as direct:
        direct.credit(user_id, 100, "bought")
        charge = direct.charge(user_id, 40, "run")
    proxy = DroppingProxy(int(server.base_url.rsplit(":", 1)[1]), drop_first=1)
    try:
        with BillingClient(base_url=proxy.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            refund = billing.refund(charge.transaction_id, user_id=user_id, amount=10, description="lost answer")
    finally:
        proxy.close()

    assert proxy.dropped == 1 and refund.replayed
    assert (refund.balance, refund.refunded_total) == (70, 10)
    assert ledger_state(db, user_id) == (70, 70, 3)


def test_a_credit_is_not_refundable_and_another_accounts_charge_is_not_found(
    billing: BillingClient, user_id: uuid.UUID
) -> None:
    credit = billing.credit(user_id, 100, "bought")
    charge = billing.charge(user_id, 10, "run")

    with pytest.raises(NotRefundable) as credit_refund:
        billing.refund(credit.transaction_id, user_id=user_id, description="x")
    with pytest.raises(TransactionNotFound) as elsewhere:
        billing.refund(charge.transaction_id, user_id=uuid.uuid4(), description="x")
    assert (credit_refund.value.status, credit_refund.value.code) == (422, "not_refundable")
    assert (elsewhere.value.status, elsewhere.value.code) == (404, "transaction_not_found")


def test_the_async_client_credits_with_terms_lists_voids_and_refunds(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    async def scenario() -> None:
        async with AsyncBillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
            bought = await billing.credit(user_id, 100, "bought")
            trial = await billing.credit(user_id, 30, "trial", expires_at=expires_at, category="promotional")
            assert trial.grant_id is not None and bought.grant_id is not None
            grants = await billing.grants(user_id)
            assert [(g.grant_id, g.expires_at) for g in grants] == [
                (trial.grant_id, expires_at),  # same priority: the one that expires goes first
                (bought.grant_id, None),
            ]
            charge = await billing.charge(user_id, 50, "run")  # 30 of the trial, 20 bought
            voided = await billing.void_grant(trial.grant_id)
            assert (voided.voided, voided.replayed) == (0, False)  # already spent: nothing left to void
            assert (await billing.void_grant(trial.grant_id)).replayed
            with pytest.raises(RefundExceedsCharge):
                await billing.refund(charge.transaction_id, user_id=user_id, amount=51, description="too much")
            refund = await billing.refund(charge.transaction_id, user_id=user_id, description="all of it")
            assert (refund.amount, refund.balance, refund.refunded_total) == (50, 130, 50)
            # The trial was voided since: its 30 come back as a grant of their own, with no expiry.
            grants = await billing.grants(user_id)
            assert sorted((g.source, g.category, g.remaining, g.expires_at) for g in grants) == [
                ("credit", "paid", 100, None),
                ("refund", "promotional", 30, None),
            ]
            account = await billing.balance(user_id)
            assert (account.balance, account.expiring, account.next_expiry) == (130, 0, None)

    asyncio.run(scenario())
    assert ledger_state(db, user_id) == (130, 130, 4)  # 2 credits, the charge, the refund: no empty void row
