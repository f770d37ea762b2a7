"""Refunds: give back all or part of a debit or a capture. No HTTP here.

The tokens go back to the grants that paid for the charge, the last drawn first (so the most durable tokens
come back first and a partial refund never revives a trial about to lapse before paid tokens). A grant that
has expired or been voided since cannot take them back: its share becomes a grant of its own, with no expiry,
of the same category and priority. Refunds of one charge never add up to more than it: each runs under the
account row lock and reads what was refunded before it in a snapshot taken under that lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from billing_service.db import confirm_replicated
from billing_service.errors import (
    IdempotencyConflict,
    IdempotencyKeyReused,
    NotRefundable,
    RefundExceedsCharge,
    TransactionNotFound,
)
from billing_service.events import config as events
from billing_service.grants.rules import lock_account, sweep_locked
from billing_service.idempotency import request_hash
from billing_service.refunds import sql

REFUNDABLE = ("debit", "capture")


@dataclass(frozen=True)
class Refund:
    transaction_id: UUID
    refund_of: UUID
    amount: int
    balance: int
    refunded_total: int  # of the charge, this refund included
    replayed: bool = False


@dataclass(frozen=True)
class Returns:
    """Where a refund's tokens go: back into live grants, and new grants for the shares of dead ones."""

    returned: list[dict[str, Any]]
    new_grants: list[tuple[int, int, str]]  # (amount, priority, category)


def plan_returns(
    funding: list[dict[str, Any]] | None, already_refunded: int, amount: int, grants: dict[str, dict[str, Any]]
) -> Returns:
    """Walk the charge's funding from the last grant drawn back to the first, past what earlier refunds took."""
    returned: dict[str, int] = {}
    new_grants: list[tuple[int, int, str]] = []
    skip, left = already_refunded, amount
    for entry in reversed(funding or []):
        share = entry["amount"] - min(skip, entry["amount"])
        skip -= entry["amount"] - share
        back = min(share, left)
        left -= back
        if back:
            grant = grants.get(entry["grant_id"])
            if grant is not None and grant["live"]:
                returned[entry["grant_id"]] = returned.get(entry["grant_id"], 0) + back
            else:
                priority, category = (grant["priority"], grant["category"]) if grant else (50, "paid")
                new_grants.append((back, priority, category))
        if not left:
            break
    if left:  # a charge posted before grants existed names no grant: its refund is plain paid tokens
        new_grants.append((left, 50, "paid"))
    return Returns([{"grant_id": grant_id, "amount": back} for grant_id, back in returned.items()], new_grants)


async def refund(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    transaction_id: UUID,
    amount: int | None,
    description: str,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    posted_by: str | None = None,
    request_id: str | None = None,
) -> Refund:
    """Refund `amount` (default: all that is left to refund) of the user's debit or capture `transaction_id`."""
    digest = request_hash(
        "refund",
        user_id=str(user_id),
        transaction_id=str(transaction_id),
        amount=amount,
        description=description,
        metadata=metadata,
    )
    keyed = {"user_id": user_id, "idempotency_key": idempotency_key}
    async with pool.connection() as conn:
        try:
            async with conn.transaction():
                if not await lock_account(conn, user_id=user_id):
                    raise TransactionNotFound()
                # Under the lock: a due grant's expiry row goes before the refund, so its balance_after is exact.
                await sweep_locked(conn, user_id=user_id)
                if idempotency_key is not None and (earlier := await _earlier(conn, keyed)) is not None:
                    return _replay(earlier, digest)
                cursor = await conn.execute(sql.REFUND_CONTEXT, {"user_id": user_id, "transaction_id": transaction_id})
                context = await cursor.fetchone()
                if context is None:
                    raise TransactionNotFound()
                kind, charged, funding, refunded, grants = context
                if kind not in REFUNDABLE:
                    raise NotRefundable(f"A {kind} cannot be refunded; only a debit or a capture.")
                room = charged - refunded
                amount = room if amount is None else amount
                if amount == 0 or amount > room:
                    raise RefundExceedsCharge(
                        f"The charge was {charged} and {refunded} of it is refunded already; "
                        f"at most {room} more can be refunded."
                    )
                returns = plan_returns(funding, refunded, amount, grants)
                cursor = await conn.execute(
                    sql.REFUND,
                    {
                        "user_id": user_id,
                        "transaction_id": transaction_id,
                        "amount": amount,
                        "description": description,
                        "metadata": Jsonb(metadata) if metadata is not None else None,
                        "idempotency_key": idempotency_key,
                        "request_hash": digest if idempotency_key is not None else None,
                        "posted_by": posted_by,
                        "request_id": request_id,
                        "returned": Jsonb(returns.returned),
                        "new_amounts": [new[0] for new in returns.new_grants],
                        "new_priorities": [new[1] for new in returns.new_grants],
                        "new_categories": [new[2] for new in returns.new_grants],
                        "refunded_total": refunded + amount,
                        "charged": charged,
                        "events": events.enabled,
                    },
                )
                refund_id, balance = await cursor.fetchone() or (None, None)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "transactions_idempotency_key_unique":
                raise
            # The same key was spent at the same moment by a write that takes no account lock first (a charge).
            earlier = await _earlier(conn, keyed)
            if earlier is None:
                raise IdempotencyConflict() from exc
            return _replay(earlier, digest)
    return Refund(refund_id, transaction_id, amount, balance, refunded + amount)


async def _earlier(conn: psycopg.AsyncConnection[Any], keyed: dict[str, Any]) -> tuple[Any, ...] | None:
    cursor = await conn.execute(sql.EXISTING_REFUND, keyed)
    earlier = await cursor.fetchone()
    if earlier is not None:
        await confirm_replicated(conn)  # see ledger.rules._post: a replay is an acknowledgement too
    return earlier


def _replay(earlier: tuple[Any, ...], digest: bytes) -> Refund:
    refund_id, amount, balance, stored_hash, refund_of, refunded_total = earlier
    if refund_of is None or stored_hash is None or bytes(stored_hash) != digest:
        raise IdempotencyKeyReused()
    return Refund(refund_id, refund_of, amount, balance, int(refunded_total), replayed=True)
