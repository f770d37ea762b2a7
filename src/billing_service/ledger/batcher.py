"""Charge coalescing: many charges, one commit.

One row-locked transaction per charge cannot beat PostgreSQL's own rate on a hot account: every commit
holds the row lock through its fsync. So each worker gathers the charges that arrive while its previous
batch is committing (up to `batch_max_size`) and applies them in one transaction:

1. lock the batch's accounts in user_id order (a fixed order: two batches can never deadlock), then read
   the Idempotency-Keys they already hold — a fresh snapshot taken after the locks, so a twin committed by
   another worker is seen;
2. decide each charge on its own, in arrival order, against the running available balance
   (`balance - held`), exactly as the single-statement CHARGE would one after another, drawing the account's
   grant slots in their order (`_draw`, the same walk as billing_draw in migration 0006) as of the batch's
   instant, taken after the locks; an account with a grant due to expire goes to the single path, which sweeps;
3. insert the accepted ledger rows and set each account's new balance and last_seq, set-based, and commit.

The outbox rides in the same statement: each accepted charge's transaction.posted, and the balance.low
crossings and balance.depleted refusals the plan found, numbered from the locked rows' last_event_seq exactly
as the single-statement path would number them one charge after another.

Both round trips are pipelined. A charge is acknowledged only after its batch commits. A charge that the
batch cannot decide exactly (refused while its account has holds, whose expiry needs the sweep-and-retry
of the single path) and every charge of a batch that fails for a reason other than the database being
down, falls back to `ledger.charge`, the single-statement path: one bad charge never fails its neighbours.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.coalescing import WriteCoalescer, json_rows, resolve
from billing_service.db import confirm_replicated
from billing_service.errors import (
    AccountNotFound,
    BillingError,
    IdempotencyKeyReused,
    InsufficientBalance,
)
from billing_service.events import config as events
from billing_service.idempotency import posting_hash
from billing_service.ledger import rules as ledger
from billing_service.ledger import sql


@dataclass
class _Charge:
    user_id: UUID
    amount: int
    description: str
    metadata: dict[str, Any] | None
    idempotency_key: str | None
    request_hash: bytes
    future: asyncio.Future[ledger.Posted]
    posted_by: str | None = None
    request_id: str | None = None
    # Filled in when planned: the ledger row this charge becomes.
    seq: int = 0
    balance_after: int = 0
    event_seq: int = 0
    funding: list[dict[str, Any]] = field(default_factory=list)
    replay_of: _Charge | None = None
    fallback: bool = False
    committed: bool = False


@dataclass
class _Account:
    balance: int
    held: int
    last_seq: int
    last_event_seq: int
    low_balance_threshold: int | None
    low_balance_armed: bool
    low_balance_event_seq: int | None
    depleted_notified: bool
    next_expiry: datetime | None
    slots: list[dict[str, Any]]  # accounts.grants: the grant slots in draw order
    changed: bool = False
    grants_due: bool = False
    loaded_slots: int = 0  # how many slots the locked row had: the plan drops a prefix of them

    def __post_init__(self) -> None:
        self.loaded_slots = len(self.slots)


@dataclass
class _Event:
    user_id: UUID
    seq: int
    type: str
    data: dict[str, Any]


class ChargeBatcher(WriteCoalescer[_Charge]):
    def __init__(self, pool: AsyncConnectionPool, *, max_size: int = 256, max_inflight: int = 1) -> None:
        super().__init__(max_size=max_size, max_inflight=max_inflight)
        self._pool = pool

    async def charge(
        self,
        *,
        user_id: UUID,
        amount: int,
        description: str,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        posted_by: str | None = None,
        request_id: str | None = None,
    ) -> ledger.Posted:
        digest = posting_hash("charge", user_id=user_id, amount=amount, description=description, metadata=metadata)
        item = _Charge(
            user_id,
            amount,
            description,
            metadata,
            idempotency_key,
            digest,
            asyncio.get_running_loop().create_future(),
            posted_by,
            request_id,
        )
        posted: ledger.Posted = await self._submit(item)
        return posted

    async def _single(self, item: _Charge) -> ledger.Posted:
        return await ledger.charge(
            self._pool,
            user_id=item.user_id,
            amount=item.amount,
            description=item.description,
            metadata=item.metadata,
            idempotency_key=item.idempotency_key,
            posted_by=item.posted_by,
            request_id=item.request_id,
        )

    async def _apply(self, batch: list[_Charge]) -> None:
        user_ids = sorted({item.user_id for item in batch})
        keyed = [item for item in batch if item.idempotency_key is not None]
        outcomes: dict[int, ledger.Posted | BaseException | None] = {}
        async with self._pool.connection() as conn, conn.pipeline() as pipeline:
            async with conn.transaction():
                locked = await conn.execute(sql.BATCH_LOCK_ACCOUNTS, {"user_ids": user_ids})
                after_locks = await conn.execute(
                    sql.BATCH_PLANNED_AT_AND_KEYS,
                    {
                        "keys": json_rows(
                            {"user_id": item.user_id, "idempotency_key": item.idempotency_key} for item in keyed
                        )
                    },
                )
                await pipeline.sync()
                accounts = {row[0]: _Account(*row[1:]) for row in await locked.fetchall()}
                planned_at, spent = await after_locks.fetchone() or (None, None)
                for account in accounts.values():
                    account.grants_due = account.next_expiry is not None and account.next_expiry <= planned_at
                # (user_id, key) -> (transaction id, balance_after, request hash) of the rows that spent them
                stored = {
                    (UUID(user_id), key): (UUID(transaction_id), balance_after, bytes.fromhex(digest))
                    for user_id, key, transaction_id, balance_after, digest in spent or ()
                }
                other_events: list[_Event] = []
                planned = _plan(batch, accounts, stored, outcomes, other_events)
                inserted = None
                if planned or other_events:
                    params = _apply_params(planned, accounts, other_events)
                    inserted = await conn.execute(sql.BATCH_APPLY, {**params, "planned_at": planned_at})
            await pipeline.sync()
            for item in planned:
                item.committed = True
            ids = {(row[0], row[1]): row[2] for row in await inserted.fetchall()} if inserted else {}
            if stored and inserted is None:
                # Only replays, and nothing written whose commit would have waited for the synchronous
                # standby: an earlier attempt may have committed only locally (see ledger.rules._post).
                await confirm_replicated(conn)
        for item in planned:
            outcomes[id(item)] = ledger.Posted(ids[(item.user_id, item.seq)], item.balance_after)
        for item in batch:
            if item.replay_of is not None:
                original = outcomes[id(item.replay_of)]
                assert isinstance(original, ledger.Posted)
                outcomes[id(item)] = ledger.Posted(original.transaction_id, original.balance, replayed=True)
        for item in batch:
            if not item.fallback:
                _resolve(item, outcomes[id(item)])


def _plan(
    batch: list[_Charge],
    accounts: dict[UUID, _Account],
    stored: dict[tuple[UUID, str], tuple[Any, ...]],
    outcomes: dict[int, ledger.Posted | BaseException | None],
    other_events: list[_Event],
) -> list[_Charge]:
    """Decide every charge in arrival order against the running balance. Returns the ones to post, and
    appends to `other_events` the balance.low and balance.depleted events the plan fires."""
    planned: list[_Charge] = []
    posted_keys: dict[tuple[UUID, str], _Charge] = {}
    for item in batch:
        key = (item.user_id, item.idempotency_key) if item.idempotency_key is not None else None
        account = accounts.get(item.user_id)
        if key is not None and key in stored:
            transaction_id, balance_after, request_hash = stored[key]
            if bytes(request_hash) != item.request_hash:
                outcomes[id(item)] = IdempotencyKeyReused()
            else:
                outcomes[id(item)] = ledger.Posted(transaction_id, balance_after, replayed=True)
        elif key is not None and key in posted_keys:
            twin = posted_keys[key]
            if twin.request_hash != item.request_hash:
                outcomes[id(item)] = IdempotencyKeyReused()
            else:
                item.replay_of = twin
        elif account is None:
            outcomes[id(item)] = AccountNotFound(status_code=402)
        elif account.grants_due:
            item.fallback = True  # the single path writes the expiry rows first
        elif account.balance - account.held >= item.amount:
            item.funding = _draw(account.slots, item.amount)
            account.balance -= item.amount
            account.last_seq += 1
            account.changed = True
            item.seq, item.balance_after = account.last_seq, account.balance
            if events.enabled:
                account.last_event_seq += 1
                item.event_seq = account.last_event_seq
            _check_threshold(item.user_id, account, other_events)
            planned.append(item)
            if key is not None:
                posted_keys[key] = item
        elif account.held > 0:
            # Expired holds may still count in `held`; the single path sweeps them and decides exactly.
            item.fallback = True
        else:
            outcomes[id(item)] = InsufficientBalance(
                f"The available balance is {account.balance - account.held}; this charge needs {item.amount}."
            )
            if events.enabled and not account.depleted_notified:
                account.depleted_notified = account.changed = True
                account.last_event_seq += 1
                data = {"user_id": str(item.user_id), "operation": "charge", "requested": item.amount}
                other_events.append(
                    _Event(item.user_id, account.last_event_seq, "balance.depleted", _data(data, account))
                )
    return planned


def _draw(slots: list[dict[str, Any]], amount: int) -> list[dict[str, Any]]:
    """billing_draw (migration 0006) for an account with no grant due: take from the slots in order, drop the
    emptied ones. Returns the funding. The guard (balance - held >= amount) has checked that they cover it."""
    funding = []
    for slot in slots:
        take = min(amount, slot["remaining"])
        if take:
            slot["remaining"] -= take
            amount -= take
            funding.append({"grant_id": slot["grant_id"], "amount": take})
        if not amount:
            break
    if amount:  # the slots always hold balance - held (billing audit); never post a draw they do not cover
        raise RuntimeError("the grant slots do not cover a guarded draw")
    slots[:] = [slot for slot in slots if slot["remaining"] > 0]
    return funding


def _data(data: dict[str, Any], account: _Account) -> dict[str, Any]:
    available = account.balance - account.held
    return {**data, "available": available, "balance": account.balance, "held": account.held}


def _check_threshold(user_id: UUID, account: _Account, other_events: list[_Event]) -> None:
    """The same rule as events/sql.py `lowering_set`, for one debit already applied to `account`: with the outbox
    on, a crossing fires balance.low and disarms; on or off, available at or above the threshold re-arms."""
    threshold = account.low_balance_threshold
    if threshold is None:
        return
    available = account.balance - account.held
    if events.enabled and account.low_balance_armed and available < threshold:
        account.low_balance_armed = False
        account.last_event_seq += 1
        account.low_balance_event_seq = account.last_event_seq
        data = {"user_id": str(user_id), "threshold": threshold}
        other_events.append(_Event(user_id, account.last_event_seq, "balance.low", _data(data, account)))
    elif available >= threshold:
        account.low_balance_armed = True


class PlannedRow(Protocol):
    """A write a batch planned: what its ledger row needs (a charge here, a capture in holds/batcher.py)."""

    @property
    def user_id(self) -> UUID | None: ...
    @property
    def seq(self) -> int: ...
    @property
    def amount(self) -> int: ...
    @property
    def balance_after(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Any] | None: ...
    @property
    def idempotency_key(self) -> str | None: ...
    @property
    def request_hash(self) -> bytes: ...
    @property
    def event_seq(self) -> int: ...
    @property
    def posted_by(self) -> str | None: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def funding(self) -> list[dict[str, Any]]: ...


def ledger_row(item: PlannedRow, *, description: str, hold_id: UUID | None = None) -> dict[str, Any]:
    """One object of the %(rows)s document that ledger/sql.py `batch_ledger_rows` reads: the row as planned."""
    return {
        "user_id": item.user_id,
        "seq": item.seq,
        "amount": item.amount,
        "balance_after": item.balance_after,
        "description": description,
        "metadata": item.metadata,
        "idempotency_key": item.idempotency_key,
        "request_hash": item.request_hash.hex() if item.idempotency_key is not None else None,
        "event_seq": item.event_seq,
        "posted_by": item.posted_by,
        "request_id": item.request_id,
        "funding": item.funding,
        "hold_id": hold_id,
    }


def _apply_params(planned: list[_Charge], accounts: dict[UUID, _Account], other_events: list[_Event]) -> dict[str, Any]:
    return {
        "events": events.enabled,
        "rows": json_rows(ledger_row(item, description=item.description) for item in planned),
        "other_events": json_rows(
            {"user_id": event.user_id, "seq": event.seq, "type": event.type, "data": event.data}
            for event in other_events
        ),
        "accounts": json_rows(
            {
                "user_id": user_id,
                "balance": account.balance,
                "last_seq": account.last_seq,
                "last_event_seq": account.last_event_seq,
                "armed": account.low_balance_armed,
                "low_event_seq": account.low_balance_event_seq,
                "depleted": account.depleted_notified,
                "dropped": account.loaded_slots - len(account.slots),
                "first_remaining": account.slots[0]["remaining"] if account.slots else None,
            }
            for user_id, account in accounts.items()
            if account.changed
        ),
    }


def _resolve(item: _Charge, outcome: ledger.Posted | BaseException | None) -> None:
    if outcome is None:  # pragma: no cover - every charge gets an outcome or a fallback
        outcome = BillingError("The charge could not be decided.")
    resolve(item, outcome)
