"""Grants through the client: a credit's terms and its grant, the draw order, expiry, voids."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from billing_client import (
    BillingClient,
    ExpiresAtInPast,
    Funding,
    Grant,
    GrantNotFound,
    InvalidRequest,
    Posted,
)

from .sdk_support import ledger_state


def _grant(posted: Posted) -> uuid.UUID:
    assert posted.grant_id is not None, "a credit names the grant it created"
    return posted.grant_id


def _in(**delta: float) -> datetime:
    # Whole microseconds survive the round trip through PostgreSQL exactly.
    return datetime.now(UTC).replace(microsecond=0) + timedelta(**delta)


def test_a_credit_with_terms_creates_a_grant_with_those_terms(billing: BillingClient, user_id: uuid.UUID) -> None:
    expires_at = _in(days=3)
    trial = _grant(billing.credit(user_id, 30, "trial", expires_at=expires_at, priority=10, category="promotional"))
    bought = _grant(billing.credit(user_id, 100, "bought"))

    by_id = {grant.grant_id: grant for grant in billing.grants(user_id)}
    assert by_id[trial] == Grant(
        grant_id=trial,
        user_id=user_id,
        amount=30,
        remaining=30,
        reserved=0,
        priority=10,
        category="promotional",
        expires_at=expires_at,
        created_at=by_id[trial].created_at,
        source="credit",
    )
    plain = by_id[bought]
    assert (plain.priority, plain.category, plain.expires_at) == (50, "paid", None)  # the service's defaults

    account = billing.balance(user_id)
    assert (account.balance, account.available, account.expiring, account.next_expiry) == (130, 130, 30, expires_at)
    credit_row = next(iter(billing.iter_transactions(user_id)))
    assert (credit_row.type, credit_row.grant_id, credit_row.funding) == (
        "credit",
        bought,
        [Funding(bought, 100)],
    )
    assert credit_row.posted_by and credit_row.request_id


def test_grants_list_in_draw_order_and_a_charge_draws_them_so(billing: BillingClient, user_id: uuid.UUID) -> None:
    oldest = _grant(billing.credit(user_id, 10, "paid, no expiry"))
    later = _grant(billing.credit(user_id, 10, "expires in 5 days", expires_at=_in(days=5)))
    first = _grant(billing.credit(user_id, 10, "lowest priority", priority=10))
    sooner = _grant(billing.credit(user_id, 10, "expires in 2 days", expires_at=_in(days=2)))
    newest = _grant(billing.credit(user_id, 10, "paid, no expiry, newer"))

    # The lowest priority first, then the earliest expiry (none last), then the oldest.
    assert [grant.grant_id for grant in billing.grants(user_id)] == [first, sooner, later, oldest, newest]

    charged = billing.charge(user_id, 25, "run")
    debit = billing.transactions(user_id, limit=1).transactions[0]
    assert debit.id == charged.transaction_id
    assert debit.funding == [Funding(first, 10), Funding(sooner, 10), Funding(later, 5)]
    assert [(g.grant_id, g.remaining) for g in billing.grants(user_id)] == [(later, 5), (oldest, 10), (newest, 10)]


def test_a_grant_expires_exactly_and_leaves_an_expiry_row(billing: BillingClient, user_id: uuid.UUID) -> None:
    billing.credit(user_id, 100, "bought")
    expires_at = datetime.now(UTC) + timedelta(seconds=1)
    soon = _grant(billing.credit(user_id, 20, "flash trial", expires_at=expires_at))
    time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.1)

    assert billing.balance(user_id).balance == 100  # reads stop counting it at expires_at
    charged = billing.charge(user_id, 10, "after the trial ended")
    assert charged.balance == 90
    types = [(t.type, t.amount, t.grant_id) for t in billing.iter_transactions(user_id)]
    assert types[:2] == [("debit", -10, None), ("expiry", -20, soon)]  # the expiry comes before the debit


def test_voiding_a_grant_removes_what_is_left_once(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 100, "bought")
    trial = _grant(billing.credit(user_id, 30, "trial", priority=10, category="promotional"))
    billing.charge(user_id, 10, "run")  # drawn from the trial first

    voided = billing.void_grant(trial, description="trial revoked")
    again = billing.void_grant(trial)

    assert (voided.voided, voided.replayed, voided.grant.remaining) == (20, False, 0)
    assert voided.transaction_id is not None and voided.grant.voided_at is not None
    assert (again.voided, again.transaction_id, again.replayed) == (0, None, True)
    assert again.grant == voided.grant
    assert ledger_state(db, user_id) == (100, 100, 4)
    assert trial not in {grant.grant_id for grant in billing.grants(user_id)}
    void_row = billing.transactions(user_id, limit=1).transactions[0]
    assert (void_row.id, void_row.type, void_row.amount, void_row.grant_id, void_row.description) == (
        voided.transaction_id,
        "void",
        -20,
        trial,
        "trial revoked",
    )


def test_an_unknown_grant_is_grant_not_found(billing: BillingClient) -> None:
    with pytest.raises(GrantNotFound) as missing:
        billing.void_grant(uuid.uuid4())
    assert (missing.value.status, missing.value.code) == (404, "grant_not_found")


def test_a_credit_expiring_in_the_past_is_refused_and_moves_nothing(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 5, "bought")
    with pytest.raises(ExpiresAtInPast) as refused:
        billing.credit(user_id, 30, "stale trial", expires_at=_in(days=-1))
    assert (refused.value.status, refused.value.code) == (422, "expires_at_in_past")
    assert isinstance(refused.value, InvalidRequest)
    assert ledger_state(db, user_id) == (5, 5, 1)


def test_balance_by_category_and_at_a_past_moment(billing: BillingClient, user_id: uuid.UUID) -> None:
    billing.credit(user_id, 100, "bought")
    billing.credit(user_id, 30, "trial", priority=10, category="promotional")
    before_charge = datetime.now(UTC)
    time.sleep(0.01)
    billing.charge(user_id, 40, "agent run")  # the promotional grant first (priority 10), then 10 paid

    split = billing.balance(user_id, by_category=True)
    assert (split.balance, split.available, split.categories) == (90, 90, {"paid": 90, "promotional": 0})
    assert billing.balance(user_id).categories is None

    past = billing.balance(user_id, at=before_charge)
    assert (past.balance, past.at, past.held) == (130, before_charge, None)
    with pytest.raises(ValueError, match="time zone"):
        billing.balance(user_id, at=before_charge.replace(tzinfo=None))
    with pytest.raises(ValueError, match="category"):
        billing.balance(user_id, at=before_charge, by_category=True)
