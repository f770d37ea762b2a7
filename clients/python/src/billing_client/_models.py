"""What the service answers, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID


@dataclass(frozen=True)
class Posted:
    """A ledger transaction that exists: `balance` is the balance right after it.

    `replayed` is True when the service answered from an earlier request with the same Idempotency-Key,
    which is what a retry after a lost response looks like: the money moved once.
    """

    transaction_id: UUID
    balance: int
    replayed: bool = False


@dataclass(frozen=True)
class Account:
    """`balance` is the posted balance; `held` what active holds reserve; `available` what a charge may take.

    `held` and `available` come with `balance()`; an `open_account()` answer has only the balance.
    """

    user_id: UUID
    balance: int
    held: int | None = None
    available: int | None = None


@dataclass(frozen=True)
class Transaction:
    id: UUID
    user_id: UUID
    amount: int  # signed: debits negative, credits positive
    description: str
    created_at: datetime
    type: Literal["debit", "credit", "capture"]
    balance_after: int
    metadata: dict[str, Any] | None = None
    hold_id: UUID | None = None  # set on captures

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Transaction:
        return cls(
            id=UUID(row["id"]),
            user_id=UUID(row["user_id"]),
            amount=int(row["amount"]),
            description=row["description"],
            created_at=datetime.fromisoformat(row["created_at"]),
            type=row["type"],
            balance_after=int(row["balance_after"]),
            metadata=row.get("metadata"),
            hold_id=UUID(row["hold_id"]) if row.get("hold_id") else None,
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
            parent_id=UUID(row["parent_id"]) if row.get("parent_id") else None,
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
