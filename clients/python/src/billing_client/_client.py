"""`BillingClient` and `AsyncBillingClient`: the same methods, blocking or awaitable.

Both send every write with an `Idempotency-Key` (a fresh UUID unless the caller passes one) and retry
connection failures, 502/503/504 and 429 with the SAME key, so a retry after a lost response replays the
first answer instead of charging again. (Voiding a grant needs no key: a repeat is already harmless.)

Each public method describes its request as a `_Call` (built by the functions below, shared by both
clients) and hands it to the client's `_send`, the only place that does I/O and retries.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import httpx
import stamina

from billing_client._config import DEFAULT_RETRY, DEFAULT_TIMEOUT, RETRYABLE_STATUSES, RetryPolicy
from billing_client._exceptions import BillingError, ServiceUnavailable, error_from_response
from billing_client._models import (
    Account,
    Captured,
    Grant,
    Hold,
    Posted,
    Refund,
    Transaction,
    TransactionPage,
    VoidedGrant,
)

UserId = UUID | str
HoldId = UUID | str
GrantId = UUID | str
TransactionId = UUID | str
Metadata = Mapping[str, Any]
HoldStatus = Literal["any", "active", "expired", "captured", "released"]
GrantCategory = Literal["paid", "promotional"]
T = TypeVar("T")


# --- retries ------------------------------------------------------------------------------------------


class _RetryableResponse(Exception):
    """Raised inside the retry loop for a 429/502/503/504, so stamina decides whether to try again."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _backoff_hook(policy: RetryPolicy) -> Callable[[Exception], bool | float]:
    def should_retry(exc: Exception) -> bool | float:
        if isinstance(exc, _RetryableResponse):
            wait = _retry_after(exc.response)
            # A server that says when to come back is believed (within reason); otherwise back off.
            return True if wait is None else min(wait, policy.wait_max_retry_after)
        return isinstance(exc, httpx.TransportError)

    return should_retry


def _retry_context(policy: RetryPolicy) -> Any:
    return stamina.retry_context(
        on=_backoff_hook(policy),
        attempts=policy.attempts,
        timeout=policy.timeout,
        wait_initial=policy.wait_initial,
        wait_max=policy.wait_max,
        wait_jitter=policy.wait_jitter,
    )


def _gave_up(exc: Exception) -> BillingError:
    if isinstance(exc, _RetryableResponse):
        return _error(exc.response)
    return ServiceUnavailable(f"billing_service unreachable: {exc!r}", code="connection_error", status=None)


# --- requests and answers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _error(response: httpx.Response) -> BillingError:
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_response(response.status_code, body)


def _json(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    raise _error(response)


def _replayed(response: httpx.Response) -> bool:
    replayed: str | None = response.headers.get("Idempotent-Replayed")
    return replayed == "true"


def _posted(response: httpx.Response) -> Posted:
    body = _json(response)
    grant_id = body.get("grant_id")
    return Posted(
        UUID(body["transaction_id"]),
        int(body["balance"]),
        replayed=_replayed(response),
        grant_id=UUID(grant_id) if grant_id else None,
    )


def _account(response: httpx.Response) -> Account:
    body = _json(response)
    next_expiry, at = body.get("next_expiry"), body.get("at")
    return Account(
        user_id=UUID(body["user_id"]),
        balance=int(body["balance"]),
        held=body.get("held"),
        available=body.get("available"),
        expiring=body.get("expiring"),
        next_expiry=datetime.fromisoformat(next_expiry) if next_expiry else None,
        categories=body.get("categories"),
        at=datetime.fromisoformat(at) if at else None,
    )


def _balance(user_id: UserId, by_category: bool, at: datetime | None) -> _Call[Account]:
    if at is not None and by_category:
        raise ValueError("a past balance (at) has no breakdown by category")
    if at is not None and at.tzinfo is None:
        raise ValueError("at needs a time zone, e.g. datetime.now(UTC)")
    params: dict[str, str | int] = {}
    if by_category:
        params["by"] = "category"
    if at is not None:
        params["at"] = at.isoformat()
    return _Call("GET", f"/billing/balance/{user_id}", _account, params=params or None)


def _page(response: httpx.Response) -> TransactionPage:
    rows = _json(response)
    next_link = response.links.get("next", {}).get("url")
    next_cursor = parse_qs(urlsplit(next_link).query).get("cursor", [None])[0] if next_link else None
    return TransactionPage([Transaction.from_json(row) for row in rows], next_cursor, next_link)


def _same_origin_path(link: str) -> str:
    # The service links with a path; should it ever send an absolute URL, keep only its path and query,
    # so the client's token is never sent anywhere but its own base_url.
    parts = urlsplit(link)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _hold(response: httpx.Response) -> Hold:
    return Hold.from_json(_json(response), replayed=_replayed(response))


def _holds(response: httpx.Response) -> list[Hold]:
    return [Hold.from_json(row) for row in _json(response)]


def _captured(response: httpx.Response) -> Captured:
    body = _json(response)
    return Captured(
        transaction_id=UUID(body["transaction_id"]),
        balance=int(body["balance"]),
        hold=Hold.from_json(body["hold"]),
        replayed=_replayed(response),
    )


def _grants(response: httpx.Response) -> list[Grant]:
    return [Grant.from_json(row) for row in _json(response)]


def _voided(response: httpx.Response) -> VoidedGrant:
    body = _json(response)
    transaction_id = body.get("transaction_id")
    return VoidedGrant(
        grant=Grant.from_json(body["grant"]),
        voided=int(body["voided"]),
        transaction_id=UUID(transaction_id) if transaction_id else None,
        replayed=_replayed(response),
    )


def _refunded(response: httpx.Response) -> Refund:
    body = _json(response)
    return Refund(
        transaction_id=UUID(body["transaction_id"]),
        refund_of=UUID(body["refund_of"]),
        amount=int(body["amount"]),
        balance=int(body["balance"]),
        refunded_total=int(body["refunded_total"]),
        replayed=_replayed(response),
    )


def _key(idempotency_key: str | None) -> dict[str, str]:
    # Chosen once per call, before the retry loop: every attempt of one call carries the same key.
    return {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}


def _body(**fields: Any) -> dict[str, Any]:
    return {
        name: (dict(value) if isinstance(value, Mapping) else value)
        for name, value in fields.items()
        if value is not None
    }


def _ledger_write(
    path: str, user_id: UserId, amount: int, description: str, metadata: Metadata | None, key: str | None
) -> _Call[Posted]:
    body = _body(user_id=str(user_id), amount=amount, description=description, metadata=metadata)
    return _Call("POST", path, _posted, json=body, headers=_key(key))


def _credit(
    user_id: UserId,
    amount: int,
    description: str,
    metadata: Metadata | None,
    expires_at: datetime | None,
    priority: int | None,
    category: GrantCategory | None,
    key: str | None,
) -> _Call[Posted]:
    # The grant's terms are sent only when given, so the service's defaults (priority 50, paid, no expiry)
    # stay the service's.
    body = _body(
        user_id=str(user_id),
        amount=amount,
        description=description,
        metadata=metadata,
        expires_at=expires_at.isoformat() if expires_at is not None else None,
        priority=priority,
        category=category,
    )
    return _Call("POST", "/billing/credit-tokens", _posted, json=body, headers=_key(key))


def _void_grant(grant_id: GrantId, description: str | None) -> _Call[VoidedGrant]:
    # No Idempotency-Key: voiding is idempotent by itself (a repeat removes nothing, answers replayed).
    body = _body(description=description) or None
    return _Call("POST", f"/billing/grants/{grant_id}/void", _voided, json=body)


def _refund(
    transaction_id: TransactionId,
    user_id: UserId,
    amount: int | None,
    description: str,
    metadata: Metadata | None,
    key: str | None,
) -> _Call[Refund]:
    body = _body(user_id=str(user_id), amount=amount, description=description, metadata=metadata)
    return _Call("POST", f"/billing/transactions/{transaction_id}/refund", _refunded, json=body, headers=_key(key))


def _history(user_id: UserId, limit: int, cursor: str | None) -> _Call[TransactionPage]:
    params: dict[str, str | int] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    return _Call("GET", f"/billing/transactions/{user_id}", _page, params=params)


def _create_hold(
    user_id: UserId, amount: int, description: str, ttl_seconds: int, metadata: Metadata | None, key: str | None
) -> _Call[Hold]:
    body = _body(
        user_id=str(user_id), amount=amount, description=description, ttl_seconds=ttl_seconds, metadata=metadata
    )
    return _Call("POST", "/billing/holds", _hold, json=body, headers=_key(key))


def _capture(
    hold_id: HoldId,
    amount: int,
    description: str | None,
    metadata: Metadata | None,
    final: bool,
    allow_overrun: bool,
    key: str | None,
) -> _Call[Captured]:
    body = _body(amount=amount, description=description, metadata=metadata, final=final, allow_overrun=allow_overrun)
    return _Call("POST", f"/billing/holds/{hold_id}/capture", _captured, json=body, headers=_key(key))


def _carve_child(
    hold_id: HoldId, amount: int, description: str, ttl_seconds: int, metadata: Metadata | None, key: str | None
) -> _Call[Hold]:
    body = _body(amount=amount, description=description, ttl_seconds=ttl_seconds, metadata=metadata)
    return _Call("POST", f"/billing/holds/{hold_id}/children", _hold, json=body, headers=_key(key))


def _list_holds(user_id: UserId, status: HoldStatus, limit: int) -> _Call[list[Hold]]:
    params: dict[str, str | int] = {"user_id": str(user_id), "status": status, "limit": limit}
    return _Call("GET", "/billing/holds", _holds, params=params)


class _Base:
    def __init__(self, *, base_url: str, token: str, timeout: float, retry: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._timeout = timeout
        self._auth = {"Authorization": f"Bearer {token}"}

    def __repr__(self) -> str:
        # Never the token: clients end up in logs and tracebacks.
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _request_args(self, call: _Call[Any]) -> dict[str, Any]:
        return {
            "method": call.method,
            "url": self.base_url + call.path,
            "json": call.json,
            "params": call.params,
            # One request id per call, shared by its retries: the service logs every attempt under it.
            "headers": {**self._auth, "X-Request-ID": uuid.uuid4().hex, **call.headers},
            "timeout": self._timeout,
        }


# --- the blocking client ------------------------------------------------------------------------------


class BillingClient(_Base):
    """A blocking client.

    >>> with BillingClient(base_url="http://billing:8000", token=token) as billing:
    ...     billing.credit(user_id, 1000, "monthly grant")
    ...     billing.charge(user_id, 120, "run 42", metadata={"run_id": "42"})

    Pass `http_client` to share a connection pool (the client then does not close it), or `transport` to
    route requests through a custom httpx transport.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url=base_url, token=token, timeout=timeout, retry=retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: _Call[T]) -> T:
        args = self._request_args(call)
        try:
            for attempt in _retry_context(self.retry):
                with attempt:
                    response = self._http.request(**args)
                    if response.status_code in RETRYABLE_STATUSES:
                        raise _RetryableResponse(response)
        except (_RetryableResponse, httpx.TransportError) as exc:
            raise _gave_up(exc) from exc
        return call.parse(response)

    def charge(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Posted:
        """Debit `amount` tokens. Raises `InsufficientBalance` or `AccountNotFound` without moving money."""
        return self._send(
            _ledger_write("/billing/charge-tokens", user_id, amount, description, metadata, idempotency_key)
        )

    def credit(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        metadata: Metadata | None = None,
        expires_at: datetime | None = None,
        priority: int | None = None,
        category: GrantCategory | None = None,
        idempotency_key: str | None = None,
    ) -> Posted:
        """Credit `amount` tokens as a grant, opening the account if needed.

        The grant's terms are optional: `expires_at` (timezone-aware, in the future; its unspent tokens leave
        the balance then), `priority` (0..100, lower is spent first) and `category`. Without them the service
        grants paid tokens of priority 50 that never expire. `Posted.grant_id` names the grant.
        """
        return self._send(
            _credit(user_id, amount, description, metadata, expires_at, priority, category, idempotency_key)
        )

    def open_account(self, user_id: UserId, *, idempotency_key: str | None = None) -> Account:
        """Open an account with balance 0; returns the existing one if it is already open."""
        return self._send(
            _Call("POST", "/billing/accounts", _account, json={"user_id": str(user_id)}, headers=_key(idempotency_key))
        )

    def balance(self, user_id: UserId, *, by_category: bool = False, at: datetime | None = None) -> Account:
        """The posted balance, what holds reserve, and what is available; `by_category` adds what is available
        by grant category; `at` (with a time zone) gives the posted balance at that moment instead."""
        return self._send(_balance(user_id, by_category, at))

    def transactions(self, user_id: UserId, *, limit: int = 100, cursor: str | None = None) -> TransactionPage:
        """One page of history, newest first."""
        return self._send(_history(user_id, limit, cursor))

    def iter_transactions(self, user_id: UserId, *, page_size: int = 500) -> Iterator[Transaction]:
        """Every transaction, newest first, fetching the next page (from the `Link` header) only when needed."""
        page = self.transactions(user_id, limit=page_size)
        while True:
            yield from page.transactions
            if page.next_link is None:
                return
            page = self._send(_Call("GET", _same_origin_path(page.next_link), _page))

    def create_hold(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        ttl_seconds: int = 900,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve `amount` tokens for `ttl_seconds`. Raises `InsufficientBalance` if `available` is short."""
        return self._send(_create_hold(user_id, amount, description, ttl_seconds, metadata, idempotency_key))

    def capture(
        self,
        hold_id: HoldId,
        amount: int,
        *,
        description: str | None = None,
        metadata: Metadata | None = None,
        final: bool = False,
        allow_overrun: bool = False,
        idempotency_key: str | None = None,
    ) -> Captured:
        """Debit `amount` from the hold; `final=True` also releases what it still reserves."""
        return self._send(_capture(hold_id, amount, description, metadata, final, allow_overrun, idempotency_key))

    def release(self, hold_id: HoldId, *, idempotency_key: str | None = None) -> Hold:
        """Return what the hold (and its child budgets) still reserves to the available balance."""
        return self._send(_Call("POST", f"/billing/holds/{hold_id}/release", _hold, headers=_key(idempotency_key)))

    def extend(self, hold_id: HoldId, ttl_seconds: int, *, idempotency_key: str | None = None) -> Hold:
        """Renew the hold's lease for `ttl_seconds` from now."""
        return self._send(
            _Call(
                "POST",
                f"/billing/holds/{hold_id}/extend",
                _hold,
                json={"ttl_seconds": ttl_seconds},
                headers=_key(idempotency_key),
            )
        )

    def carve_child(
        self,
        hold_id: HoldId,
        amount: int,
        description: str,
        *,
        ttl_seconds: int = 900,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Carve a sub-agent's budget out of the hold's remaining."""
        return self._send(_carve_child(hold_id, amount, description, ttl_seconds, metadata, idempotency_key))

    def get_hold(self, hold_id: HoldId) -> Hold:
        return self._send(_Call("GET", f"/billing/holds/{hold_id}", _hold))

    def list_holds(self, user_id: UserId, *, status: HoldStatus = "any", limit: int = 100) -> list[Hold]:
        """A user's holds, newest first."""
        return self._send(_list_holds(user_id, status, limit))

    def grants(self, user_id: UserId) -> list[Grant]:
        """The live grants (tokens left to draw, or reserved by holds) in the order debits draw them: the
        lowest priority first, then the earliest expiry (none last), then the oldest."""
        return self._send(_Call("GET", f"/billing/grants/{user_id}", _grants))

    def void_grant(self, grant_id: GrantId, *, description: str | None = None) -> VoidedGrant:
        """Remove what is left of a grant (a revoked trial). Raises `GrantNotFound`. Idempotent: voiding again
        removes nothing and answers with `voided=0`, `replayed=True`."""
        return self._send(_void_grant(grant_id, description))

    def refund(
        self,
        transaction_id: TransactionId,
        *,
        user_id: UserId,
        amount: int | None = None,
        description: str,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Refund:
        """Give back all (`amount=None`: whatever is not refunded yet) or part of a debit or a capture of
        `user_id`'s account, to the grants that paid for it, the last drawn first.

        Raises `RefundExceedsCharge` past what is left of the charge, `NotRefundable` for anything but a debit
        or a capture, and `TransactionNotFound` for an unknown transaction or another account's.
        """
        return self._send(_refund(transaction_id, user_id, amount, description, metadata, idempotency_key))

    @contextmanager
    def reserve(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        ttl_seconds: int = 900,
        metadata: Metadata | None = None,
    ) -> Iterator[Reservation]:
        """Hold `amount` for the block, capture what the block uses, and release the rest however it ends.

        >>> with billing.reserve(user_id, 5000, "agent run 42") as run:
        ...     for step in agent.steps():
        ...         run.capture(step.tokens, metadata={"step": step.id})

        An exception in the block releases the hold and propagates; nothing uncaptured is debited.
        """
        reservation = Reservation(
            self, self.create_hold(user_id, amount, description, ttl_seconds=ttl_seconds, metadata=metadata)
        )
        try:
            yield reservation
        finally:
            reservation.release_rest()


class Reservation:
    """An active hold inside `BillingClient.reserve`: capture from it as the run consumes tokens."""

    def __init__(self, client: BillingClient, hold: Hold) -> None:
        self.client = client
        self.hold = hold

    def capture(self, amount: int, *, description: str | None = None, metadata: Metadata | None = None) -> Captured:
        captured = self.client.capture(self.hold.hold_id, amount, description=description, metadata=metadata)
        self.hold = captured.hold
        return captured

    def release_rest(self) -> None:
        if self.hold.status != "active":
            return
        # Best effort: if the release cannot get through, the hold's lease expires and frees the tokens.
        with contextlib.suppress(BillingError):
            self.hold = self.client.release(self.hold.hold_id)


# --- the async client ---------------------------------------------------------------------------------


class AsyncBillingClient(_Base):
    """The awaitable twin of `BillingClient`.

    >>> async with AsyncBillingClient(base_url="http://billing:8000", token=token) as billing:
    ...     posted = await billing.charge(user_id, 120, "run 42")
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url=base_url, token=token, timeout=timeout, retry=retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: _Call[T]) -> T:
        args = self._request_args(call)
        try:
            async for attempt in _retry_context(self.retry):
                with attempt:
                    response = await self._http.request(**args)
                    if response.status_code in RETRYABLE_STATUSES:
                        raise _RetryableResponse(response)
        except (_RetryableResponse, httpx.TransportError) as exc:
            raise _gave_up(exc) from exc
        return call.parse(response)

    async def charge(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Posted:
        """Debit `amount` tokens. Raises `InsufficientBalance` or `AccountNotFound` without moving money."""
        return await self._send(
            _ledger_write("/billing/charge-tokens", user_id, amount, description, metadata, idempotency_key)
        )

    async def credit(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        metadata: Metadata | None = None,
        expires_at: datetime | None = None,
        priority: int | None = None,
        category: GrantCategory | None = None,
        idempotency_key: str | None = None,
    ) -> Posted:
        """Credit `amount` tokens as a grant, opening the account if needed.

        The grant's terms are optional: `expires_at` (timezone-aware, in the future; its unspent tokens leave
        the balance then), `priority` (0..100, lower is spent first) and `category`. Without them the service
        grants paid tokens of priority 50 that never expire. `Posted.grant_id` names the grant.
        """
        return await self._send(
            _credit(user_id, amount, description, metadata, expires_at, priority, category, idempotency_key)
        )

    async def open_account(self, user_id: UserId, *, idempotency_key: str | None = None) -> Account:
        """Open an account with balance 0; returns the existing one if it is already open."""
        return await self._send(
            _Call("POST", "/billing/accounts", _account, json={"user_id": str(user_id)}, headers=_key(idempotency_key))
        )

    async def balance(self, user_id: UserId, *, by_category: bool = False, at: datetime | None = None) -> Account:
        """The posted balance, what holds reserve, and what is available; `by_category` adds what is available
        by grant category; `at` (with a time zone) gives the posted balance at that moment instead."""
        return await self._send(_balance(user_id, by_category, at))

    async def transactions(self, user_id: UserId, *, limit: int = 100, cursor: str | None = None) -> TransactionPage:
        """One page of history, newest first."""
        return await self._send(_history(user_id, limit, cursor))

    async def iter_transactions(self, user_id: UserId, *, page_size: int = 500) -> AsyncIterator[Transaction]:
        """Every transaction, newest first, fetching the next page (from the `Link` header) only when needed."""
        page = await self.transactions(user_id, limit=page_size)
        while True:
            for transaction in page.transactions:
                yield transaction
            if page.next_link is None:
                return
            page = await self._send(_Call("GET", _same_origin_path(page.next_link), _page))

    async def create_hold(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        ttl_seconds: int = 900,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve `amount` tokens for `ttl_seconds`. Raises `InsufficientBalance` if `available` is short."""
        return await self._send(_create_hold(user_id, amount, description, ttl_seconds, metadata, idempotency_key))

    async def capture(
        self,
        hold_id: HoldId,
        amount: int,
        *,
        description: str | None = None,
        metadata: Metadata | None = None,
        final: bool = False,
        allow_overrun: bool = False,
        idempotency_key: str | None = None,
    ) -> Captured:
        """Debit `amount` from the hold; `final=True` also releases what it still reserves."""
        return await self._send(_capture(hold_id, amount, description, metadata, final, allow_overrun, idempotency_key))

    async def release(self, hold_id: HoldId, *, idempotency_key: str | None = None) -> Hold:
        """Return what the hold (and its child budgets) still reserves to the available balance."""
        return await self._send(
            _Call("POST", f"/billing/holds/{hold_id}/release", _hold, headers=_key(idempotency_key))
        )

    async def extend(self, hold_id: HoldId, ttl_seconds: int, *, idempotency_key: str | None = None) -> Hold:
        """Renew the hold's lease for `ttl_seconds` from now."""
        return await self._send(
            _Call(
                "POST",
                f"/billing/holds/{hold_id}/extend",
                _hold,
                json={"ttl_seconds": ttl_seconds},
                headers=_key(idempotency_key),
            )
        )

    async def carve_child(
        self,
        hold_id: HoldId,
        amount: int,
        description: str,
        *,
        ttl_seconds: int = 900,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Carve a sub-agent's budget out of the hold's remaining."""
        return await self._send(_carve_child(hold_id, amount, description, ttl_seconds, metadata, idempotency_key))

    async def get_hold(self, hold_id: HoldId) -> Hold:
        return await self._send(_Call("GET", f"/billing/holds/{hold_id}", _hold))

    async def list_holds(self, user_id: UserId, *, status: HoldStatus = "any", limit: int = 100) -> list[Hold]:
        """A user's holds, newest first."""
        return await self._send(_list_holds(user_id, status, limit))

    async def grants(self, user_id: UserId) -> list[Grant]:
        """The live grants (tokens left to draw, or reserved by holds) in the order debits draw them: the
        lowest priority first, then the earliest expiry (none last), then the oldest."""
        return await self._send(_Call("GET", f"/billing/grants/{user_id}", _grants))

    async def void_grant(self, grant_id: GrantId, *, description: str | None = None) -> VoidedGrant:
        """Remove what is left of a grant (a revoked trial). Raises `GrantNotFound`. Idempotent: voiding again
        removes nothing and answers with `voided=0`, `replayed=True`."""
        return await self._send(_void_grant(grant_id, description))

    async def refund(
        self,
        transaction_id: TransactionId,
        *,
        user_id: UserId,
        amount: int | None = None,
        description: str,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
    ) -> Refund:
        """Give back all (`amount=None`: whatever is not refunded yet) or part of a debit or a capture of
        `user_id`'s account, to the grants that paid for it, the last drawn first.

        Raises `RefundExceedsCharge` past what is left of the charge, `NotRefundable` for anything but a debit
        or a capture, and `TransactionNotFound` for an unknown transaction or another account's.
        """
        return await self._send(_refund(transaction_id, user_id, amount, description, metadata, idempotency_key))

    @asynccontextmanager
    async def reserve(
        self,
        user_id: UserId,
        amount: int,
        description: str,
        *,
        ttl_seconds: int = 900,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[AsyncReservation]:
        """Hold `amount` for the block, capture what it uses, release the rest however it ends (see
        `BillingClient.reserve`)."""
        hold = await self.create_hold(user_id, amount, description, ttl_seconds=ttl_seconds, metadata=metadata)
        reservation = AsyncReservation(self, hold)
        try:
            yield reservation
        finally:
            await reservation.release_rest()


class AsyncReservation:
    """An active hold inside `AsyncBillingClient.reserve`."""

    def __init__(self, client: AsyncBillingClient, hold: Hold) -> None:
        self.client = client
        self.hold = hold

    async def capture(
        self, amount: int, *, description: str | None = None, metadata: Metadata | None = None
    ) -> Captured:
        captured = await self.client.capture(self.hold.hold_id, amount, description=description, metadata=metadata)
        self.hold = captured.hold
        return captured

    async def release_rest(self) -> None:
        if self.hold.status != "active":
            return
        with contextlib.suppress(BillingError):
            self.hold = await self.client.release(self.hold.hold_id)
