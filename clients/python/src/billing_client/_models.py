"""What the service answers, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID


def _uuid(value: str | None) -> UUID | None:
    return UUID(value) if value else None


def _datetime(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class Posted:
    """A ledger transaction that exists: `balance` is the balance right after it.

    `replayed` is True when the service answered from an earlier request with the same Idempotency-Key,
    which is what a retry after a lost response looks like: the money moved once.
    """

    transaction_id: UUID
    balance: int
    replayed: bool = False
    grant_id: UUID | None = None  # a credit's: the grant it created


@dataclass(frozen=True)
class Account:
    """`balance` is the posted balance; `held` what active holds reserve; `available` what a charge may take;
    `expiring` the live tokens whose grant expires within 7 days, `next_expiry` the soonest such expiry.

    Everything but the balance comes with `balance()`; an `open_account()` answer has only the balance.
    `balance(by_category=True)` adds `categories` (available tokens by grant category: paid, promotional);
    `balance(at=...)` is the posted balance at that moment, and `at`, only.
    """

    user_id: UUID
    balance: int
    held: int | None = None
    available: int | None = None
    expiring: int | None = None
    next_expiry: datetime | None = None
    categories: dict[str, int] | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class Funding:
    """One grant's share of a ledger row: what a debit drew from it, or a credit or refund paid into it.
    `amount` is unsigned; the row's sign says which way the tokens moved."""

    grant_id: UUID
    amount: int


@dataclass(frozen=True)
class Transaction:
    id: UUID
    user_id: UUID
    amount: int  # signed: debits negative, credits positive
    description: str
    created_at: datetime
    type: Literal["debit", "credit", "capture", "expiry", "void", "refund"]
    balance_after: int
    metadata: dict[str, Any] | None = None
    hold_id: UUID | None = None  # set on captures
    funding: list[Funding] | None = None  # the grants this row drew from or paid into
    grant_id: UUID | None = None  # the grant a credit created, or an expiry or void closed
    refund_of: UUID | None = None  # a refund's: the transaction it gives back
    posted_by: str | None = None  # the service token's name; None on rows older than the audit trail
    request_id: str | None = None  # the X-Request-ID of the request that posted it

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Transaction:
        funding = row.get("funding")
        return cls(
            id=UUID(row["id"]),
            user_id=UUID(row["user_id"]),
            amount=int(row["amount"]),
            description=row["description"],
            created_at=datetime.fromisoformat(row["created_at"]),
            type=row["type"],
            balance_after=int(row["balance_after"]),
            metadata=row.get("metadata"),
            hold_id=_uuid(row.get("hold_id")),
            funding=[Funding(UUID(f["grant_id"]), int(f["amount"])) for f in funding] if funding is not None else None,
            grant_id=_uuid(row.get("grant_id")),
            refund_of=_uuid(row.get("refund_of")),
            posted_by=row.get("posted_by"),
            request_id=row.get("request_id"),
        )


@dataclass(frozen=True)
class TransactionPage:
    """One page of history, newest first. Pass `next_cursor` back to get the next page; None on the last."""

    transactions: list[Transaction]
    next_cursor: str | None
    next_link: str | None = None  # the `Link: rel="next"` target, as the service gave it


@dataclass(frozen=True)
class Hold:
    """Tokens reserved for an agent run. `remaining` may still be captured (or carved into child budgets)."""

    hold_id: UUID
    user_id: UUID
    parent_id: UUID | None
    amount: int
    remaining: int
    captured: int
    status: Literal["active", "captured", "released", "expired"]
    expires_at: datetime
    description: str
    metadata: dict[str, Any] | None = None
    replayed: bool = False

    @classmethod
    def from_json(cls, row: dict[str, Any], *, replayed: bool = False) -> Hold:
        return cls(
            hold_id=UUID(row["hold_id"]),
            user_id=UUID(row["user_id"]),
            parent_id=_uuid(row.get("parent_id")),
            amount=int(row["amount"]),
            remaining=int(row["remaining"]),
            captured=int(row["captured"]),
            status=row["status"],
            expires_at=datetime.fromisoformat(row["expires_at"]),
            description=row["description"],
            metadata=row.get("metadata"),
            replayed=replayed,
        )


@dataclass(frozen=True)
class Captured:
    """A capture: the ledger row it posted, the balance after it, and the hold as it now stands."""

    transaction_id: UUID
    balance: int
    hold: Hold
    replayed: bool = False


@dataclass(frozen=True)
class Grant:
    """Tokens a credit (or a refund) granted, drawn down by debits in order: the lowest `priority` first, then
    the earliest `expires_at` (none last), then the oldest. `remaining` is what is left to draw; `reserved`
    what active holds took of it and may give back."""

    grant_id: UUID
    user_id: UUID
    amount: int
    remaining: int
    reserved: int
    priority: int
    category: Literal["paid", "promotional"]
    expires_at: datetime | None
    created_at: datetime
    source: Literal["credit", "refund", "allowance", "opening"]
    voided_at: datetime | None = None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Grant:
        return cls(
            grant_id=UUID(row["grant_id"]),
            user_id=UUID(row["user_id"]),
            amount=int(row["amount"]),
            remaining=int(row["remaining"]),
            reserved=int(row["reserved"]),
            priority=int(row["priority"]),
            category=row["category"],
            expires_at=_datetime(row.get("expires_at")),
            created_at=datetime.fromisoformat(row["created_at"]),
            source=row["source"],
            voided_at=_datetime(row.get("voided_at")),
        )


@dataclass(frozen=True)
class VoidedGrant:
    """A void: the grant as it now stands, the tokens this call removed from the balance and its `void` ledger
    row. Voiding again removes nothing: `voided` is 0, `transaction_id` None and `replayed` True."""

    grant: Grant
    voided: int
    transaction_id: UUID | None
    replayed: bool = False


@dataclass(frozen=True)
class Refund:
    """A refund's own ledger row, the charge it gives back (`refund_of`), the balance after it, and
    `refunded_total`: every refund of that charge so far, this one included."""

    transaction_id: UUID
    refund_of: UUID
    amount: int
    balance: int
    refunded_total: int
    replayed: bool = False
