"""BillingClient against a real multi-worker server: every method, and every typed error."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from billing_client import (
    AccountNotFound,
    BillingClient,
    BillingError,
    Forbidden,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InsufficientBalance,
    InvalidRequest,
    Posted,
    Unauthorized,
)

from .sdk_support import FAST_RETRY, SERVICE_TOKEN, LiveServer, ledger_state, user_jwt


def test_credit_then_charge_return_typed_postings(billing: BillingClient, user_id: uuid.UUID) -> None:
    credited = billing.credit(user_id, 1000, "grant")
    charged = billing.charge(user_id, 120, "run 1", metadata={"run_id": "1", "model": "m"})

    assert isinstance(charged, Posted)
    assert (credited.balance, charged.balance) == (1000, 880)
    assert not charged.replayed
    assert billing.balance(user_id).balance == 880
    newest = next(iter(billing.iter_transactions(user_id)))
    assert (newest.id, newest.amount, newest.type, newest.metadata) == (
        charged.transaction_id,
        -120,
        "debit",
        {"run_id": "1", "model": "m"},
    )


def test_each_call_without_a_key_is_a_new_charge(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 100, "grant")
    billing.charge(user_id, 10, "same body")
    billing.charge(user_id, 10, "same body")
    assert ledger_state(db, user_id) == (80, 80, 3)


def test_the_same_key_charges_once_and_replays(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 100, "grant")
    first = billing.charge(user_id, 30, "run 7", idempotency_key="run-7")
    again = billing.charge(user_id, 30, "run 7", idempotency_key="run-7")

    assert again.replayed and not first.replayed
    assert again.transaction_id == first.transaction_id
    assert ledger_state(db, user_id) == (70, 70, 2)


def test_insufficient_balance_is_typed_and_moves_nothing(
    billing: BillingClient, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    billing.credit(user_id, 5, "grant")
    with pytest.raises(InsufficientBalance) as refused:
        billing.charge(user_id, 6, "too much")
    assert (refused.value.status, refused.value.code) == (402, "insufficient_balance")
    assert isinstance(refused.value, BillingError)
    assert ledger_state(db, user_id) == (5, 5, 1)


def test_unknown_account_is_account_not_found(billing: BillingClient, user_id: uuid.UUID) -> None:
    with pytest.raises(AccountNotFound) as on_charge:
        billing.charge(user_id, 1, "nobody")
    with pytest.raises(AccountNotFound) as on_read:
        billing.balance(user_id)
    assert (on_charge.value.status, on_read.value.status) == (402, 404)
    assert on_read.value.code == "account_not_found"


def test_a_key_reused_with_another_body_is_an_idempotency_conflict(billing: BillingClient, user_id: uuid.UUID) -> None:
    billing.credit(user_id, 100, "grant")
    billing.charge(user_id, 10, "run 8", idempotency_key="run-8")
    with pytest.raises(IdempotencyConflict) as conflict:
        billing.charge(user_id, 11, "run 8", idempotency_key="run-8")
    assert isinstance(conflict.value, IdempotencyKeyReused)
    assert (conflict.value.status, conflict.value.code) == (422, "idempotency_key_reused")


def test_open_account_is_idempotent(billing: BillingClient, user_id: uuid.UUID) -> None:
    opened = billing.open_account(user_id)
    again = billing.open_account(user_id)
    assert opened.user_id == again.user_id == user_id
    assert opened.balance == again.balance == 0


def test_bad_credentials_are_unauthorized_and_user_tokens_cannot_write(server: LiveServer, user_id: uuid.UUID) -> None:
    with BillingClient(base_url=server.base_url, token="not-a-token", retry=FAST_RETRY) as stranger:
        with pytest.raises(Unauthorized) as unauthorized:
            stranger.balance(user_id)
    assert unauthorized.value.status == 401

    with BillingClient(base_url=server.base_url, token=user_jwt(user_id), retry=FAST_RETRY) as user:
        with pytest.raises(Forbidden):
            user.charge(user_id, 1, "self-service")
        with pytest.raises(AccountNotFound):
            user.balance(user_id)  # a user may read their own account: 404, not 403


def test_invalid_input_is_refused_without_a_retry(server: LiveServer, user_id: uuid.UUID) -> None:
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY, http_client=http) as billing:
        with pytest.raises(InvalidRequest) as invalid:
            billing.charge(user_id, 0, "zero")
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert len(sent) == 1
    assert not http.is_closed  # an injected client belongs to the caller
    http.close()


def test_iter_transactions_follows_link_pages_lazily(server: LiveServer, user_id: uuid.UUID) -> None:
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY, http_client=http) as billing:
        for n in range(1, 8):
            billing.credit(user_id, n, f"credit {n}")
        sent.clear()

        transactions = billing.iter_transactions(user_id, page_size=3)
        first_three = [next(transactions).amount for _ in range(3)]
        assert len(sent) == 1  # the second page is not fetched until it is needed
        rest = [transaction.amount for transaction in transactions]

    assert first_three + rest == [7, 6, 5, 4, 3, 2, 1]
    assert len(sent) == 3
    assert "cursor=" in str(sent[2].url)
    http.close()


def test_transactions_page_carries_the_next_cursor(billing: BillingClient, user_id: uuid.UUID) -> None:
    for n in range(1, 4):
        billing.credit(user_id, n, f"credit {n}")
    page = billing.transactions(user_id, limit=2)
    assert [t.amount for t in page.transactions] == [3, 2]
    last = billing.transactions(user_id, limit=2, cursor=page.next_cursor)
    assert [t.amount for t in last.transactions] == [1]
    assert last.next_cursor is None


def test_repr_never_shows_the_token(billing: BillingClient) -> None:
    assert SERVICE_TOKEN not in repr(billing)
