"""The ledger's rules: charge, credit, open an account, read balance and history, audit.

No HTTP here. Each function runs one statement from `sql` and turns its outcome into a result or a
`BillingError`. The API and the CLI both call these, so an operator's `billing charge` follows the same
path as the orchestrator's POST.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, LiteralString
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from billing_service.db import confirm_replicated
from billing_service.errors import (
    AccountNotFound,
    BalanceLimitExceeded,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InsufficientBalance,
    InvalidRequest,
)
from billing_service.events import config as events
from billing_service.events.rules import notify_depleted
from billing_service.holds.rules import sweep_account
from billing_service.idempotency import posting_hash
from billing_service.ledger import sql
from billing_service.ledger.sql import DRAW_RACED_EXPIRY

HISTORY_STREAM_BATCH = 2000
HISTORY_FIRST_BATCH = 100


@dataclass(frozen=True)
class Posted:
    """A ledger transaction that now exists (or already did, when `replayed`)."""

    transaction_id: UUID
    balance: int
    replayed: bool = False
    grant_id: UUID | None = None  # a credit's: the grant it created


@dataclass(frozen=True)
class GrantTerms:
    """How a credit's tokens are spent: lower priority first, then the earliest expiry, then the oldest."""

    priority: int = 50
    category: str = "paid"
    expires_at: datetime | None = None
    source: str = "credit"


PLAIN_GRANT = GrantTerms()


@dataclass(frozen=True)
class Account:
    user_id: UUID
    balance: int


@dataclass(frozen=True)
class AuditFinding:
    user_id: UUID
    balance: int
    ledger_sum: int
    broken_links: int
    seq_gaps: int


async def _post(
    pool: AsyncConnectionPool,
    statement: LiteralString,
    operation: str,
    *,
    user_id: UUID,
    amount: int,
    description: str,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
    posted_by: str | None,
    request_id: str | None,
    terms: GrantTerms = PLAIN_GRANT,
) -> tuple[str, Posted, bool | None]:
    """(outcome, what was posted, and for a refusal whether balance.depleted was already notified)."""
    # Only a keyed request is ever compared with another, so only a keyed one pays for its hash.
    digest = (
        posting_hash(operation, user_id=user_id, amount=amount, description=description, metadata=metadata, terms=terms)
        if idempotency_key is not None
        else None
    )
    params = {
        "user_id": user_id,
        "amount": amount,
        "description": description,
        "metadata": Jsonb(metadata) if metadata is not None else None,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "events": events.enabled,
        "default_threshold": events.default_threshold,
        "posted_by": posted_by,
        "request_id": request_id,
        "priority": terms.priority,
        "category": terms.category,
        "expires_at": terms.expires_at,
        "source": terms.source,
    }
    depleted_notified = grant_id = None
    async with pool.connection() as conn:
        try:
            try:
                cursor = await conn.execute(statement, params)
            except psycopg.Error as exc:
                if exc.sqlstate != DRAW_RACED_EXPIRY:
                    raise
                # A grant expired between the guard and the draw: decide again, now that it is due.
                cursor = await conn.execute(statement, params)
            decided = await cursor.fetchone() or (None,) * 6
            outcome, transaction_id, balance, stored_hash, depleted_notified, grant_id = decided
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "transactions_idempotency_key_unique":
                raise
            # A concurrent request with the same key won the race and committed; ours rolled back whole.
            cursor = await conn.execute(sql.IDEMPOTENT_REPLAY, params)
            row = await cursor.fetchone()
            if row is None:
                raise IdempotencyConflict() from exc
            outcome, (transaction_id, balance, stored_hash, grant_id) = "replayed", row
        except psycopg.errors.NumericValueOutOfRange as exc:
            raise BalanceLimitExceeded() from exc
        if outcome == "insufficient_balance" and idempotency_key is not None:
            # A twin with the same key may have held the row lock while we queued on it: our snapshot
            # predates its key, and its debit made our re-checked balance too low. Its answer is the
            # replay, not a 402; its row is visible to this new statement.
            cursor = await conn.execute(sql.IDEMPOTENT_REPLAY, params)
            if (replay := await cursor.fetchone()) is not None:
                outcome, (transaction_id, balance, stored_hash, grant_id) = "replayed", replay
        if outcome == "replayed":
            # The first attempt may have committed only locally (503 commit_not_replicated): not a 200 until
            # the synchronous standby has it.
            await confirm_replicated(conn)
    if outcome == "replayed" and bytes(stored_hash) != digest:
        raise IdempotencyKeyReused()
    posted = Posted(transaction_id, balance, replayed=outcome == "replayed", grant_id=grant_id)
    return outcome, posted, depleted_notified


async def charge(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    amount: int,
    description: str,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    posted_by: str | None = None,
    request_id: str | None = None,
) -> Posted:
    """Debit `amount` if the balance covers it. Refused debits write nothing, not even the key."""
    post = partial(
        _post,
        pool,
        sql.CHARGE,
        "charge",
        user_id=user_id,
        amount=amount,
        description=description,
        metadata=metadata,
        idempotency_key=idempotency_key,
        posted_by=posted_by,
        request_id=request_id,
    )
    outcome, posted, depleted_notified = await post()
    if outcome == "account_not_found":
        # The seed answers an unknown user on a charge with 402, like a lack of funds.
        raise AccountNotFound(status_code=402)
    if outcome == "insufficient_balance" and await sweep_account(pool, user_id=user_id):
        # Expired holds still counted in `held`, or a grant was due to expire: with the expiry written, try
        # exactly once more.
        outcome, posted, depleted_notified = await post()
    if outcome == "insufficient_balance":
        if depleted_notified is False and events.enabled:
            # The rare refusal path, never the charge statement: balance.depleted, once until the next credit.
            await notify_depleted(pool, user_id=user_id, amount=amount, operation="charge")
        raise InsufficientBalance(f"The available balance is {posted.balance}; this charge needs {amount}.")
    return posted


async def credit(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    amount: int,
    description: str,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    posted_by: str | None = None,
    request_id: str | None = None,
    terms: GrantTerms = PLAIN_GRANT,
) -> Posted:
    """Credit `amount` as a grant on `terms`, opening the account if this is its first transaction."""
    post = partial(
        _post,
        pool,
        sql.CREDIT,
        "credit",
        user_id=user_id,
        amount=amount,
        description=description,
        metadata=metadata,
        idempotency_key=idempotency_key,
        posted_by=posted_by,
        request_id=request_id,
        terms=terms,
    )
    outcome, posted, _ = await post()
    for _ in range(2):
        if outcome != "grants_due":
            break
        await sweep_account(pool, user_id=user_id)  # a grant of the account expired: its expiry row goes first
        outcome, posted, _ = await post()
    if outcome == "grants_due":  # grants kept expiring under it: nothing was written, a retry is safe
        raise IdempotencyConflict("Grants of this account expired while the credit was posted; retry it.")
    if outcome == "already_expired":
        raise InvalidRequest("expires_at: must be in the future.", code="expires_at_in_past")
    return posted


_DEFAULT = object()


async def open_account(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    idempotency_key: str | None = None,
    low_balance_threshold: int | None | object = _DEFAULT,
) -> tuple[Account, bool, bool]:
    """Open an account with balance 0. Returns (account, created, replayed).

    Without `low_balance_threshold` the account gets the service's default (BILLING_LOW_BALANCE_THRESHOLD);
    None means no low-balance alert."""
    threshold = events.default_threshold if low_balance_threshold is _DEFAULT else low_balance_threshold
    async with pool.connection() as conn:
        cursor = await conn.execute(
            sql.OPEN_ACCOUNT,
            {"user_id": user_id, "idempotency_key": idempotency_key, "low_balance_threshold": threshold},
        )
        created = await cursor.fetchone()
        if created is not None:
            return Account(user_id=user_id, balance=created[0]), True, False
        # Already open (possibly by a concurrent twin that committed after our snapshot): read it fresh.
        cursor = await conn.execute(sql.ACCOUNT, {"user_id": user_id})
        row = await cursor.fetchone()
        await confirm_replicated(conn)  # the opening we report may be one the standby never confirmed
    if row is None:  # pragma: no cover - accounts are never deleted
        raise IdempotencyConflict()
    balance, opened_with_key = row
    replayed = idempotency_key is not None and opened_with_key == idempotency_key
    return Account(user_id=user_id, balance=balance), False, replayed


@dataclass(frozen=True)
class Threshold:
    user_id: UUID
    balance: int
    held: int
    low_balance_threshold: int | None


async def set_low_balance_threshold(pool: AsyncConnectionPool, *, user_id: UUID, threshold: int | None) -> Threshold:
    """Set (or, with None, remove) the account's low-balance threshold; re-arms the alert."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.SET_THRESHOLD, {"user_id": user_id, "low_balance_threshold": threshold})
        row = await cursor.fetchone()
    if row is None:
        raise AccountNotFound()
    return Threshold(*row)


@dataclass(frozen=True)
class Balance:
    user_id: UUID
    balance: int
    held: int
    available: int
    expiring: int = 0  # live tokens whose grant expires within 7 days
    next_expiry: datetime | None = None  # the soonest expiry of a live grant


async def balance_with_holds(pool: AsyncConnectionPool, *, user_id: UUID) -> Balance:
    """What the account holds now: the balance (live tokens), what active holds reserve, what is left for
    charges and new holds, and what expires soon. Exact at this instant, swept or not."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.BALANCE_WITH_HOLDS, {"user_id": user_id})
        row = await cursor.fetchone()
    if row is None:
        raise AccountNotFound()
    return _balance(user_id, *row)


def _balance(user_id: UUID, held: int, available: int, expiring: int, next_expiry: datetime | None) -> Balance:
    """A row of BALANCE_WITH_HOLDS's columns as a Balance: the balance is what is available plus what is held."""
    return Balance(user_id, available + held, held, available, expiring, next_expiry)


async def balances_with_holds(pool: AsyncConnectionPool, *, user_ids: list[UUID]) -> dict[UUID, Balance]:
    """`balance_with_holds` of many accounts in one statement and one snapshot; an unknown account is absent."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.BALANCES_WITH_HOLDS, {"user_ids": user_ids})
        rows = await cursor.fetchall()
    return {row[0]: _balance(*row) for row in rows}


async def balance_by_category(pool: AsyncConnectionPool, *, user_id: UUID) -> dict[Literal["paid", "promotional"], int]:
    """The live, unreserved tokens by grant category."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.BALANCE_BY_CATEGORY, {"user_id": user_id})
        found: dict[str, int] = dict(await cursor.fetchall())
    return {"paid": found.get("paid", 0), "promotional": found.get("promotional", 0)}


async def balance_at(pool: AsyncConnectionPool, *, user_id: UUID, at: datetime) -> int:
    """The posted balance at time `at`: balance_after of the last transaction at or before it."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.BALANCE_AT, {"user_id": user_id, "at": at})
        row = await cursor.fetchone()
    if row is None:
        raise AccountNotFound()
    posted: int = row[0]
    return posted


async def usage(
    pool: AsyncConnectionPool, *, user_id: UUID, group_by: str, since: datetime | None, until: datetime | None
) -> list[str]:
    """Spend per run, model or UTC day, as JSON texts, from one index range scan of the user's rows."""
    async with pool.connection() as conn:
        await _require_account(conn, user_id)
        cursor = await conn.execute(
            sql.usage(group_by),
            {"user_id": user_id, "since": since or _EARLIEST, "until": until or _LATEST},
        )
        return [row[0] for row in await cursor.fetchall()]


_EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        version, seq = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(":")
        value = int(seq)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidRequest("The cursor is not one this service issued.", code="invalid_cursor") from exc
    if version != "v1" or not 0 < value < 2**63:
        raise InvalidRequest("The cursor is not one this service issued.", code="invalid_cursor")
    return value


async def history_page(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    limit: int,
    cursor: str | None = None,
    filters: Mapping[str, object] | None = None,
) -> tuple[list[str], str | None]:
    """One page of history, newest first, as JSON texts; plus the cursor of the next page, if any.

    `filters` (run_id, type, since, until) narrow it; each is served by an index.
    """
    before_seq = decode_cursor(cursor) if cursor is not None else 2**63 - 1
    filters = filters or {}
    async with pool.connection() as conn:
        await _require_account(conn, user_id)
        result = await conn.execute(
            sql.filtered_history(sql.HISTORY_PAGE, filters),
            {**filters, "user_id": user_id, "before_seq": before_seq, "limit": limit + 1},
        )
        rows = await result.fetchall()
    next_cursor = encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None
    return [row[1] for row in rows[:limit]], next_cursor


async def history_stream(
    pool: AsyncConnectionPool, *, user_id: UUID, filters: Mapping[str, object] | None = None
) -> AsyncIterator[bytes]:
    """The whole history as a JSON array, streamed from a server-side cursor: flat memory at any size.

    Raises AccountNotFound before the first byte, so the caller can still answer 404.
    """
    async with pool.connection() as conn:
        await _require_account(conn, user_id)

    async def chunks() -> AsyncIterator[bytes]:
        async with pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(name="history")
            cursor.itersize = HISTORY_STREAM_BATCH
            await cursor.execute(
                sql.filtered_history(sql.HISTORY_ALL, filters or {}), {**(filters or {}), "user_id": user_id}
            )
            separator = b"["
            # A small first batch gets the first byte out quickly; larger ones after it keep the stream cheap.
            batch = HISTORY_FIRST_BATCH
            while rows := await cursor.fetchmany(batch):
                yield separator + ",".join(row[1] for row in rows).encode()
                separator, batch = b",", HISTORY_STREAM_BATCH
            yield b"[]" if separator == b"[" else b"]"

    return chunks()


async def _require_account(conn: psycopg.AsyncConnection[Any], user_id: UUID) -> None:
    cursor = await conn.execute(sql.BALANCE, {"user_id": user_id})
    if await cursor.fetchone() is None:
        raise AccountNotFound()


def audit(conn: psycopg.Connection[Any]) -> tuple[int, list[AuditFinding]]:
    """Every account whose balance differs from its ledger, or whose balance_after chain is broken."""
    accounts = conn.execute(sql.COUNT_ACCOUNTS).fetchone()
    findings = []
    with conn.transaction(), conn.cursor(name="audit") as cursor:
        cursor.execute(sql.AUDIT)
        for user_id, account_balance, ledger_sum, broken_links, seq_gaps in cursor:
            findings.append(AuditFinding(user_id, account_balance, int(ledger_sum), broken_links, seq_gaps))
    return (accounts[0] if accounts else 0), findings


def unattributed_rows(conn: psycopg.Connection[Any]) -> int:
    """Ledger rows that do not say who posted them (those written before migration 0004 have no caller)."""
    row = conn.execute(sql.UNATTRIBUTED_ROWS).fetchone()
    return int(row[0]) if row else 0


async def ping(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute(sql.PING)


@dataclass(frozen=True)
class BalancePoint:
    at: datetime
    balance: int


async def balance_series(
    pool: AsyncConnectionPool,
    *,
    user_id: UUID,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 1000,
) -> list[BalancePoint]:
    """The posted balance after each of the newest `limit` rows in [since, until), oldest first."""
    async with pool.connection() as conn:
        await _require_account(conn, user_id)
        cursor = await conn.execute(
            sql.BALANCE_SERIES,
            {"user_id": user_id, "since": since or _EARLIEST, "until": until or _LATEST, "limit": limit},
        )
        rows = await cursor.fetchall()
    return [BalancePoint(at, balance) for at, balance in reversed(rows)]


@dataclass(frozen=True)
class AccountSummary:
    user_id: UUID
    balance: int
    held: int
    updated_at: datetime


def user_id_range(prefix: str) -> tuple[UUID, UUID]:
    """The smallest and largest user ids starting with `prefix` (hex digits; dashes ignored)."""
    digits = prefix.replace("-", "").lower()
    if not 0 < len(digits) <= 32 or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidRequest("Give a user id or the start of one (hex digits).")
    return UUID(digits.ljust(32, "0")), UUID(digits.ljust(32, "f"))


async def find_accounts(pool: AsyncConnectionPool, *, prefix: str, limit: int = 20) -> list[AccountSummary]:
    """Accounts whose user id starts with `prefix`: one range scan of the primary key."""
    low, high = user_id_range(prefix)
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.ACCOUNTS_IN_RANGE, {"low": low, "high": high, "limit": limit})
        return [AccountSummary(*row) for row in await cursor.fetchall()]


async def recent_accounts(pool: AsyncConnectionPool, *, limit: int = 20) -> list[AccountSummary]:
    """The most recently changed accounts, newest first (a sort over all accounts: an operator's read)."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.RECENT_ACCOUNTS, {"limit": limit})
        return [AccountSummary(*row) for row in await cursor.fetchall()]


async def backdate_demo_rows(pool: AsyncConnectionPool, *, user_id: UUID, stamps: list[tuple[UUID, datetime]]) -> int:
    """`billing demo` only: move the demo account's rows back in time. `stamps` are (transaction id, time) in
    posting order; the times must rise and lie in the past, so created_at keeps rising with seq."""
    times = [at for _, at in stamps]
    if any(later < earlier for earlier, later in zip(times, times[1:], strict=False)):
        raise InvalidRequest("Demo times must rise with the posting order.")
    async with pool.connection() as conn:
        cursor = await conn.execute(
            sql.DEMO_BACKDATE, {"user_id": user_id, "ids": [i for i, _ in stamps], "ats": times}
        )
        return cursor.rowcount
