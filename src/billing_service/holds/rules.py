"""Holds: two-phase charges with leases, and nested run budgets for sub-agents.

A hold reserves tokens from the available balance (balance - held) without posting anything; captures
post ledger rows (type 'capture') against it, possibly many times while a stream runs; release, expiry or
a `final` capture give back the rest. A child hold is carved out of its parent's remaining, so a
sub-agent gets its own budget without touching the available balance again.

Every operation on an existing hold runs as: lock the tree's root row, expire what is due in that tree,
then one statement from `sql`. The root lock serialises everything that changes a tree, which is what
makes a capture racing a release, an expiry, or a sibling's carve come out exact (see holds/sql.py).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ParamSpec
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from billing_service.db import confirm_replicated
from billing_service.errors import (
    AccountNotFound,
    BillingError,
    CaptureExceedsHold,
    ChildExceedsParent,
    HoldDepthLimit,
    HoldNotActive,
    HoldNotFound,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InsufficientBalance,
)
from billing_service.events import config as events
from billing_service.events.rules import notify_depleted
from billing_service.grants.rules import lock_account, sweep_expired_grants, sweep_locked
from billing_service.holds import sql
from billing_service.idempotency import request_hash
from billing_service.ledger.sql import DRAW_RACED_EXPIRY

MAX_DEPTH = 8
P = ParamSpec("P")


@dataclass
class Hold:
    hold_id: UUID
    user_id: UUID
    parent_id: UUID | None
    root_id: UUID
    depth: int
    amount: int
    remaining: int
    captured: int
    status: str
    expires_at: datetime
    description: str
    metadata: dict[str, Any] | None
    created_at: datetime


@dataclass
class HoldNode:
    """A hold in its tree, with what it and everything below it captured and still reserve."""

    hold: Hold
    subtree_captured: int = 0
    subtree_remaining: int = 0
    children: list[HoldNode] = field(default_factory=list)


@dataclass(frozen=True)
class Capture:
    transaction_id: UUID
    balance: int
    hold: Hold
    replayed: bool = False


@dataclass(frozen=True)
class _Tree:
    conn: psycopg.AsyncConnection[Any]
    user_id: UUID
    root_id: UUID


def _hold(row: tuple[Any, ...]) -> Hold:
    return Hold(*row)


async def _one(cursor: psycopg.AsyncCursor[Any]) -> tuple[Any, ...]:
    """The single row every outcome statement returns (it selects FROM (VALUES (1)))."""
    row = await cursor.fetchone()
    if row is None:  # pragma: no cover - the statements always return one row
        raise RuntimeError("an outcome statement returned no row")
    return tuple(row)


def _check_replay(stored_hash: bytes | None, digest: bytes) -> None:
    if stored_hash is None or bytes(stored_hash) != digest:
        raise IdempotencyKeyReused()


@asynccontextmanager
async def _locked_tree(pool: AsyncConnectionPool, hold_id: UUID) -> AsyncIterator[_Tree]:
    """A transaction holding the tree's root lock, with the tree's due expiries already applied.

    A refusal (a `BillingError`) still commits: the refused statement changed nothing (each is one
    statement whose writes all hang on its guards), and the sweep it found due stays done. Any other
    exception rolls everything back.
    """
    async with pool.connection() as conn:
        refusal: BillingError | None = None
        async with conn.transaction():
            cursor = await conn.execute(sql.LOCK_TREE, {"hold_id": hold_id})
            row = await cursor.fetchone()
            if row is None:
                raise HoldNotFound()
            user_id, root_id = row
            await conn.execute(sql.SWEEP_TREE, {"user_id": user_id, "root_id": root_id, "events": events.enabled})
            try:
                yield _Tree(conn, user_id, root_id)
            except BillingError as exc:
                refusal = exc
        if refusal is not None:
            raise refusal


async def _read_hold(conn: psycopg.AsyncConnection[Any], hold_id: UUID) -> Hold:
    cursor = await conn.execute(sql.HOLD, {"hold_id": hold_id})
    row = await cursor.fetchone()
    if row is None:  # pragma: no cover - holds are never deleted
        raise HoldNotFound()
    return _hold(row)


async def release_expired_holds(pool: AsyncConnectionPool, *, user_id: UUID) -> int:
    """Expire the user's holds whose lease ran out, giving their tokens back to available. Returns how many
    trees were expired. Locks the expired roots (in id order) before the account row, like every hold path."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.HAS_EXPIRED_ROOTS, {"user_id": user_id})
        if not (await cursor.fetchone() or (False,))[0]:
            return 0
        async with conn.transaction():
            cursor = await conn.execute(sql.LOCK_EXPIRED_ROOTS, {"user_id": user_id})
            root_ids = [row[0] for row in await cursor.fetchall()]
            if root_ids:
                await conn.execute(
                    sql.SWEEP_ROOTS, {"user_id": user_id, "root_ids": root_ids, "events": events.enabled}
                )
    return len(root_ids)


async def sweep_account(pool: AsyncConnectionPool, *, user_id: UUID) -> bool:
    """The refusal path of every debit: expire the account's due holds and grants. True if anything changed,
    so the refused write is worth exactly one more try."""
    holds = await release_expired_holds(pool, user_id=user_id)
    grants = await sweep_expired_grants(pool, user_id=user_id)
    return bool(holds or grants)


async def sweep_due_trees(pool: AsyncConnectionPool, *, delay: float, limit: int = 500) -> int:
    """Expire every hold whose lease ran out `delay` seconds ago or more, tree by tree, each under its root lock
    (the same LOCK_TREE + SWEEP_TREE as any operation on a tree). Returns how many holds it expired."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.DUE_TREES, {"delay": delay, "limit": limit})
        trees = await cursor.fetchall()
    expired = 0
    for user_id, root_id in trees:
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(sql.LOCK_TREE, {"hold_id": root_id})
            cursor = await conn.execute(
                sql.SWEEP_TREE, {"user_id": user_id, "root_id": root_id, "events": events.enabled}
            )
            expired += (await _one(cursor))[0]
    return int(expired)


async def create_hold(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    amount: int,
    description: str,
    ttl_seconds: int,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    posted_by: str | None = None,
    request_id: str | None = None,
) -> tuple[Hold, bool]:
    """Reserve `amount` of the available balance for `ttl_seconds`. Returns (hold, replayed)."""
    digest = request_hash(
        "hold", user_id=user_id, amount=amount, description=description, ttl_seconds=ttl_seconds, metadata=metadata
    )
    params = {
        "user_id": user_id,
        "amount": amount,
        "description": description,
        "ttl_seconds": ttl_seconds,
        "metadata": Jsonb(metadata) if metadata is not None else None,
        "idempotency_key": idempotency_key,
        "request_hash": digest if idempotency_key is not None else None,
        "events": events.enabled,
        "posted_by": posted_by,
        "request_id": request_id,
    }
    for attempt in range(2):
        outcome, hold_id, stored_hash, available = await _reserve(pool, params)
        # Expired holds still count in `held` until swept: release them and try once more. The sweep runs
        # on its own connection after ours went back to the pool, so a burst of refusals cannot starve it.
        if outcome != "insufficient_balance" or attempt or not await sweep_account(pool, user_id=user_id):
            break
    if outcome == "account_not_found":
        raise AccountNotFound(status_code=402)
    if outcome == "insufficient_balance":
        await notify_depleted(pool, user_id=user_id, amount=amount, operation="hold")
        raise InsufficientBalance(f"The available balance is {available}; this hold needs {amount}.")
    if outcome == "replayed":
        _check_replay(stored_hash, digest)
    async with pool.connection() as conn:
        if outcome == "replayed":
            await confirm_replicated(conn)  # see ledger.rules._post: a replay is an acknowledgement too
        return await _read_hold(conn, hold_id), outcome == "replayed"


async def _reserve(pool: AsyncConnectionPool, params: dict[str, Any]) -> tuple[Any, ...]:
    """One HOLD_CREATE: (outcome, hold_id, stored request hash, available when refused)."""
    async with pool.connection() as conn:
        try:
            try:
                cursor = await conn.execute(sql.HOLD_CREATE, params)
            except psycopg.Error as exc:
                if exc.sqlstate != DRAW_RACED_EXPIRY:
                    raise
                cursor = await conn.execute(sql.HOLD_CREATE, params)  # a grant expired under the draw: decide again
            return await _one(cursor)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "holds_idempotency_key_unique":
                raise
            # A concurrent twin with the same key committed first; ours rolled back whole.
            cursor = await conn.execute(sql.HOLD_IDEMPOTENT_REPLAY, params)
            replay = await cursor.fetchone()
            if replay is None:
                raise IdempotencyConflict() from exc
            return "replayed", replay[0], replay[1], None


async def carve_child(
    pool: AsyncConnectionPool,
    *,
    parent_id: UUID,
    amount: int,
    description: str,
    ttl_seconds: int,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    posted_by: str | None = None,
    request_id: str | None = None,
) -> tuple[Hold, bool]:
    """Carve a child budget out of the parent hold's remaining. Returns (child, replayed)."""
    digest = request_hash(
        "child", parent_id=parent_id, amount=amount, description=description, ttl_seconds=ttl_seconds, metadata=metadata
    )
    try:
        async with _locked_tree(pool, parent_id) as tree:
            cursor = await tree.conn.execute(
                sql.HOLD_CARVE,
                {
                    "user_id": tree.user_id,
                    "hold_id": parent_id,
                    "amount": amount,
                    "description": description,
                    "ttl_seconds": ttl_seconds,
                    "metadata": Jsonb(metadata) if metadata is not None else None,
                    "max_depth": MAX_DEPTH,
                    "events": events.enabled,
                    "idempotency_key": idempotency_key,
                    "request_hash": digest if idempotency_key is not None else None,
                    "posted_by": posted_by,
                    "request_id": request_id,
                },
            )
            outcome, child_id, stored_hash, parent_remaining = await _one(cursor)
            if outcome == "hold_not_active":
                raise HoldNotActive("The parent hold is no longer active.")
            if outcome == "depth_limit":
                raise HoldDepthLimit(f"Holds nest at most {MAX_DEPTH} levels deep.")
            if outcome == "exceeds_hold":
                raise ChildExceedsParent(
                    f"The parent hold has {parent_remaining} remaining; this child budget needs {amount}."
                )
            if outcome == "replayed":
                _check_replay(stored_hash, digest)
            return await _read_hold(tree.conn, child_id), outcome == "replayed"
    except psycopg.errors.UniqueViolation as exc:
        # The key was taken at the same moment by a root hold of the same user (no tree lock there).
        if exc.diag.constraint_name != "holds_idempotency_key_unique":
            raise
        raise IdempotencyKeyReused() from exc


def capture_hash(
    *,
    hold_id: UUID,
    amount: int,
    description: str | None,
    metadata: dict[str, Any] | None,
    final: bool = False,
    allow_overrun: bool = False,
) -> bytes:
    """What makes two captures the same request under one Idempotency-Key (the capture batcher's too)."""
    return request_hash(
        "capture",
        hold_id=hold_id,
        amount=amount,
        description=description,
        metadata=metadata,
        final=final,
        allow_overrun=allow_overrun,
    )


def _decided_again_on_a_draw_race(
    operation: Callable[P, Awaitable[Capture]],
) -> Callable[P, Awaitable[Capture]]:
    """An overrun drew a grant that expired in the microseconds since its guard (BG001): the whole transaction
    rolled back, so deciding once more is safe."""

    @functools.wraps(operation)
    async def decided(*args: P.args, **kwargs: P.kwargs) -> Capture:
        try:
            return await operation(*args, **kwargs)
        except psycopg.Error as exc:
            if exc.sqlstate != DRAW_RACED_EXPIRY:
                raise
        return await operation(*args, **kwargs)

    return decided


@_decided_again_on_a_draw_race
async def capture(
    pool: AsyncConnectionPool,
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
) -> Capture:
    """Post a capture of `amount` against the hold: a ledger debit, never more than the hold allows."""
    digest = capture_hash(
        hold_id=hold_id,
        amount=amount,
        description=description,
        metadata=metadata,
        final=final,
        allow_overrun=allow_overrun,
    )
    user_id: UUID | None = None
    try:
        async with _locked_tree(pool, hold_id) as tree:
            user_id = tree.user_id
            params = {
                "user_id": tree.user_id,
                "root_id": tree.root_id,
                "hold_id": hold_id,
                "amount": amount,
                "description": description,
                "metadata": Jsonb(metadata) if metadata is not None else None,
                "final": final,
                "allow_overrun": allow_overrun,
                "events": events.enabled,
                "idempotency_key": idempotency_key,
                "request_hash": digest if idempotency_key is not None else None,
                "posted_by": posted_by,
                "request_id": request_id,
            }
            cursor = await tree.conn.execute(sql.HOLD_CAPTURE, params)
            outcome, transaction_id, balance, stored_hash, remaining = await _one(cursor)
            if outcome == "grants_due":
                # A grant of the account expired: its expiry row goes first, so this capture's balance_after
                # is exact. Still under the tree lock (trees lock before accounts).
                await lock_account(tree.conn, user_id=tree.user_id)
                await sweep_locked(tree.conn, user_id=tree.user_id)
                cursor = await tree.conn.execute(sql.HOLD_CAPTURE, params)
                outcome, transaction_id, balance, stored_hash, remaining = await _one(cursor)
            if outcome == "hold_not_active":
                raise HoldNotActive()
            if outcome == "exceeds_hold":
                raise CaptureExceedsHold(
                    f"The hold has {remaining} remaining; this capture needs {amount}. "
                    "Send allow_overrun to take the excess from the available balance."
                )
            if outcome == "insufficient_balance":
                raise InsufficientBalance(
                    f"The hold has {remaining} remaining and the available balance does not cover the other "
                    f"{amount - remaining}."
                )
            if outcome == "replayed":
                _check_replay(stored_hash, digest)
            hold = await _read_hold(tree.conn, hold_id)
            return Capture(transaction_id, balance, hold, replayed=outcome == "replayed")
    except psycopg.errors.UniqueViolation as exc:
        # The same key was used at the same moment by a plain charge (which takes no tree lock).
        if exc.diag.constraint_name != "transactions_idempotency_key_unique" or user_id is None:
            raise
        async with pool.connection() as conn:
            cursor = await conn.execute(sql.IDEMPOTENT_REPLAY, {"user_id": user_id, "idempotency_key": idempotency_key})
            row = await cursor.fetchone()
            if row is None:
                raise IdempotencyConflict() from exc
            transaction_id, balance, stored_hash, _ = row
            _check_replay(stored_hash, digest)
            return Capture(transaction_id, balance, await _read_hold(conn, hold_id), replayed=True)


async def release(pool: AsyncConnectionPool, *, hold_id: UUID, idempotency_key: str | None = None) -> tuple[Hold, bool]:
    """Void what the hold and its children still reserve. Returns (hold, replayed)."""
    digest = request_hash("release", hold_id=hold_id)
    async with _locked_tree(pool, hold_id) as tree:
        cursor = await tree.conn.execute(
            sql.HOLD_RELEASE,
            {
                "user_id": tree.user_id,
                "root_id": tree.root_id,
                "hold_id": hold_id,
                "idempotency_key": idempotency_key,
                "request_hash": digest if idempotency_key is not None else None,
                "events": events.enabled,
            },
        )
        outcome, stored_hash, _ = await _one(cursor)
        if outcome == "hold_not_active":
            raise HoldNotActive()
        if outcome == "replayed":
            _check_replay(stored_hash, digest)
        return await _read_hold(tree.conn, hold_id), outcome == "replayed"


async def extend(
    pool: AsyncConnectionPool, *, hold_id: UUID, ttl_seconds: int, idempotency_key: str | None = None
) -> tuple[Hold, bool]:
    """Renew the lease: the hold now expires no sooner than `ttl_seconds` from now (capped by its parent)."""
    digest = request_hash("extend", hold_id=hold_id, ttl_seconds=ttl_seconds)
    async with _locked_tree(pool, hold_id) as tree:
        cursor = await tree.conn.execute(
            sql.HOLD_EXTEND,
            {
                "user_id": tree.user_id,
                "hold_id": hold_id,
                "ttl_seconds": ttl_seconds,
                "idempotency_key": idempotency_key,
                "request_hash": digest if idempotency_key is not None else None,
            },
        )
        outcome, stored_hash = await _one(cursor)
        if outcome == "hold_not_active":
            raise HoldNotActive()
        if outcome == "replayed":
            _check_replay(stored_hash, digest)
        return await _read_hold(tree.conn, hold_id), outcome == "replayed"


async def hold_tree(pool: AsyncConnectionPool, *, hold_id: UUID) -> HoldNode:
    """The hold with every hold below it, each with its own and its subtree's captured and remaining."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.HOLD_TREE, {"hold_id": hold_id})
        rows = await cursor.fetchall()
    if not rows:
        raise HoldNotFound()
    nodes: dict[UUID, HoldNode] = {}
    for row in rows:  # parents come before their children
        hold = _hold(row)
        nodes[hold.hold_id] = node = HoldNode(hold)
        if hold.hold_id != hold_id:
            nodes[hold.parent_id].children.append(node)  # type: ignore[index]
    for node in reversed(nodes.values()):  # children before their parents
        node.subtree_captured = node.hold.captured + sum(child.subtree_captured for child in node.children)
        node.subtree_remaining = node.hold.remaining + sum(child.subtree_remaining for child in node.children)
    return nodes[hold_id]


async def list_holds(
    pool: AsyncConnectionPool, *, user_id: UUID, status: str, limit: int, before: UUID | None = None
) -> list[Hold]:
    """A user's holds, newest first; `before` (a hold id) pages back."""
    async with pool.connection() as conn:
        cursor = await conn.execute(
            sql.holds_of_user(status),
            {"user_id": user_id, "limit": limit, "before_id": before or UUID(int=2**128 - 1)},
        )
        return [_hold(row) for row in await cursor.fetchall()]


def audit(conn: psycopg.Connection[Any]) -> list[tuple[UUID, UUID | None, str]]:
    """Hold accounting problems: (user_id, hold_id or None for the account, what is wrong)."""
    return [(user_id, hold_id, problem) for user_id, hold_id, problem in conn.execute(sql.HOLD_AUDIT)]
