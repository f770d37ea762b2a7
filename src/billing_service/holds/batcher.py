"""Capture coalescing: a streaming agent run captures many times, so captures share commits like charges do.

One capture on its own is a transaction of five statements (lock the tree, sweep it, HOLD_CAPTURE, read the hold,
commit), and HOLD_CAPTURE is a large statement: PostgreSQL spends about 1 ms of CPU setting up and running it,
three times a charge's. Each worker therefore gathers the captures that arrive while its previous batch is
committing (up to `batch_max_size`) and settles them in one transaction of two round trips:

1. lock the batch's trees (root rows in id order), then their accounts (user_id order): the lock order of every
   hold path, so a batch never deadlocks with a single capture, a release, a sweep or the charge batcher; then,
   in a snapshot taken after the locks, read each hold, its tree's soonest lease, the trees' allocations in
   the grants' draw order, and which of the batch's Idempotency-Keys are already spent;
2. decide each capture on its own, in arrival order, exactly as HOLD_CAPTURE would one after another (the
   hold's remaining, the tree's allocation drawn in order, the account's balance, held, seq and event seq),
   as of one instant taken after the locks; then write the ledger rows, their events and the new account,
   hold and allocation values set-based, and commit.

Only the plain capture is decided here: not final, no overrun, the hold active and live with enough remaining,
nothing due in its tree or account, and a key not seen before. Anything else (a refusal, a replay, an expired
lease to sweep, a grant to expire first) goes to `holds.capture`, the single-capture path, after the batch
has committed, and so does every capture of a batch that fails before its commit for a reason other than the
database being down (coalescing.WriteCoalescer): one odd capture never fails its neighbours, and every answer
but the plain one comes from the one implementation of the contract. A capture is acknowledged only after its
batch commits.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.coalescing import WriteCoalescer, json_rows, resolve
from billing_service.events import config as events
from billing_service.holds import rules as holds
from billing_service.holds import sql
from billing_service.ledger.batcher import ledger_row


@dataclass
class _Capture:
    hold_id: UUID
    amount: int
    description: str | None
    metadata: dict[str, Any] | None
    idempotency_key: str | None
    future: asyncio.Future[holds.Capture]
    posted_by: str | None = None
    request_id: str | None = None
    final: bool = False
    allow_overrun: bool = False
    request_hash: bytes = b""
    # Filled in when planned: the ledger row this capture becomes, and the hold as it leaves it.
    user_id: UUID | None = None
    seq: int = 0
    balance_after: int = 0
    event_seq: int = 0
    funding: list[dict[str, Any]] = field(default_factory=list)
    hold: holds.Hold | None = None
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
    next_expiry: datetime | None
    changed: bool = False


@dataclass
class _HoldState:
    hold: holds.Hold
    tree_next_expiry: datetime | None  # the soonest lease among the tree's active holds
    changed: bool = False


@dataclass
class _Allocation:
    """One grant's share of a tree's reservation (a hold_funding row)."""

    user_id: UUID
    root_id: UUID
    grant_id: UUID
    amount: int
    changed: bool = False


class CaptureBatcher(WriteCoalescer[_Capture]):
    def __init__(self, pool: AsyncConnectionPool, *, max_size: int = 256, max_inflight: int = 1) -> None:
        super().__init__(max_size=max_size, max_inflight=max_inflight)
        self._pool = pool

    async def capture(
        self,
        *,
        hold_id: UUID,
        amount: int,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        final: bool = False,
        allow_overrun: bool = False,
        idempotency_key: str | None = None,
        posted_by: str | None = None,
        request_id: str | None = None,
    ) -> holds.Capture:
        """`holds.capture`, with the same arguments and answers; the plain capture shares its batch's commit."""
        item = _Capture(
            hold_id,
            amount,
            description,
            metadata,
            idempotency_key,
            asyncio.get_running_loop().create_future(),
            posted_by,
            request_id,
            final,
            allow_overrun,
        )
        if final or allow_overrun:  # a run's last capture, or one past its budget: a transaction of its own
            return await self._single(item)
        item.request_hash = holds.capture_hash(
            hold_id=hold_id, amount=amount, description=description, metadata=metadata
        )
        captured: holds.Capture = await self._submit(item)
        return captured

    async def _single(self, item: _Capture) -> holds.Capture:
        return await holds.capture(
            self._pool,
            hold_id=item.hold_id,
            amount=item.amount,
            description=item.description,
            metadata=item.metadata,
            final=item.final,
            allow_overrun=item.allow_overrun,
            idempotency_key=item.idempotency_key,
            posted_by=item.posted_by,
            request_id=item.request_id,
        )

    async def _apply(self, batch: list[_Capture]) -> None:
        hold_ids = list({item.hold_id for item in batch})
        keyed = [item for item in batch if item.idempotency_key is not None]
        async with self._pool.connection() as conn, conn.pipeline() as pipeline:
            async with conn.transaction():
                await conn.execute(sql.BATCH_LOCK_TREES, {"hold_ids": hold_ids})
                locked = await conn.execute(sql.BATCH_LOCK_ACCOUNTS, {"hold_ids": hold_ids})
                found = await conn.execute(sql.BATCH_CAPTURE_HOLDS, {"hold_ids": hold_ids})
                allocated = await conn.execute(sql.BATCH_CAPTURE_ALLOCATIONS, {"hold_ids": hold_ids})
                spent = await conn.execute(
                    sql.BATCH_CAPTURE_KEYS,
                    {"keys": json_rows({"hold_id": i.hold_id, "idempotency_key": i.idempotency_key} for i in keyed)},
                )
                await pipeline.sync()
                accounts = {row[0]: _Account(*row[1:]) for row in await locked.fetchall()}
                states: dict[UUID, _HoldState] = {}
                planned_at: datetime | None = None
                for row in await found.fetchall():
                    states[row[0]] = _HoldState(holds.Hold(*row[:13]), row[13])
                    planned_at = row[14]
                trees: dict[tuple[UUID, UUID], list[_Allocation]] = {}
                for row in await allocated.fetchall():
                    trees.setdefault((row[0], row[1]), []).append(_Allocation(*row))
                spent_keys = {(states[hold_id].hold.user_id, key) for hold_id, key in await spent.fetchall()}
                planned = _plan(batch, accounts, states, trees, spent_keys, planned_at)
                inserted = None
                if planned:
                    params = _apply_params(planned, accounts, states, trees)
                    inserted = await conn.execute(sql.BATCH_CAPTURE_APPLY, {**params, "planned_at": planned_at})
            await pipeline.sync()
            for item in planned:
                item.committed = True
            ids = {(row[0], row[1]): row[2] for row in await inserted.fetchall()} if inserted else {}
        for item in planned:
            assert item.hold is not None and item.user_id is not None
            resolve(item, holds.Capture(ids[(item.user_id, item.seq)], item.balance_after, item.hold))


def _plan(
    batch: list[_Capture],
    accounts: dict[UUID, _Account],
    states: dict[UUID, _HoldState],
    trees: dict[tuple[UUID, UUID], list[_Allocation]],
    spent_keys: set[tuple[UUID, str]],
    planned_at: datetime | None,
) -> list[_Capture]:
    """Decide every plain capture in arrival order against its hold, tree and account as the previous ones left
    them. Returns the ones to post; marks every other one for the single-capture path."""
    planned: list[_Capture] = []
    batch_keys: set[tuple[UUID, str]] = set()
    for item in batch:
        state = states.get(item.hold_id)
        if state is None or planned_at is None:
            item.fallback = True  # no such hold: the single path answers hold_not_found
            continue
        hold = state.hold
        account = accounts.get(hold.user_id)
        key = (hold.user_id, item.idempotency_key) if item.idempotency_key is not None else None
        allocation = trees.get((hold.user_id, hold.root_id), [])
        if (
            account is None
            or (key is not None and (key in spent_keys or key in batch_keys))  # a replay, or a twin in flight
            or hold.status != "active"
            or hold.expires_at <= planned_at  # its lease ran out: the single path expires it and refuses
            or (state.tree_next_expiry is not None and state.tree_next_expiry <= planned_at)  # a sweep is due
            or (account.next_expiry is not None and account.next_expiry <= planned_at)  # a grant expires first
            or hold.remaining < item.amount  # exceeds_hold, answered by the single path
            or sum(share.amount for share in allocation) < item.amount  # never post what the tree did not reserve
        ):
            item.fallback = True
            continue
        item.funding = _take(allocation, item.amount)
        state.hold = item.hold = dataclasses.replace(
            hold, remaining=hold.remaining - item.amount, captured=hold.captured + item.amount
        )
        state.changed = True
        # A capture spends reserved tokens: balance and held fall together, so available does not move, and
        # (events/sql.py lowering_set) it cannot cross the low-balance threshold, only re-arm it.
        account.balance -= item.amount
        account.held -= item.amount
        account.last_seq += 1
        account.changed = True
        if events.enabled:
            account.last_event_seq += 1
            item.event_seq = account.last_event_seq
        threshold = account.low_balance_threshold
        if threshold is not None and account.balance - account.held >= threshold:
            account.low_balance_armed = True
        item.user_id, item.seq, item.balance_after = hold.user_id, account.last_seq, account.balance
        planned.append(item)
        if key is not None:
            batch_keys.add(key)
    return planned


def _take(allocation: list[_Allocation], amount: int) -> list[dict[str, Any]]:
    """HOLD_CAPTURE's `taken`: the amount drawn from the tree's allocation in the grants' order. Returns the
    funding of the ledger row, one entry per grant drawn, in that order. The caller checked that it covers."""
    funding = []
    for share in allocation:
        take = min(amount, share.amount)
        if take:
            share.amount -= take
            share.changed = True
            amount -= take
            funding.append({"grant_id": share.grant_id, "amount": take})
        if not amount:
            break
    return funding


def _apply_params(
    planned: list[_Capture],
    accounts: dict[UUID, _Account],
    states: dict[UUID, _HoldState],
    trees: dict[tuple[UUID, UUID], list[_Allocation]],
) -> dict[str, Any]:
    return {
        "events": events.enabled,
        # HOLD_CAPTURE's coalesce(description, the hold's): a capture without one is described by its hold.
        "rows": json_rows(
            ledger_row(
                item,
                description=item.description if item.description is not None else states[item.hold_id].hold.description,
                hold_id=item.hold_id,
            )
            for item in planned
        ),
        "accounts": json_rows(
            {
                "user_id": user_id,
                "balance": account.balance,
                "held": account.held,
                "last_seq": account.last_seq,
                "last_event_seq": account.last_event_seq,
                "armed": account.low_balance_armed,
            }
            for user_id, account in accounts.items()
            if account.changed
        ),
        "holds": json_rows(
            {
                "user_id": s.hold.user_id,
                "id": s.hold.hold_id,
                "remaining": s.hold.remaining,
                "captured": s.hold.captured,
            }
            for s in states.values()
            if s.changed
        ),
        "allocations": json_rows(
            {"user_id": share.user_id, "root_id": share.root_id, "grant_id": share.grant_id, "amount": share.amount}
            for allocation in trees.values()
            for share in allocation
            if share.changed
        ),
    }
