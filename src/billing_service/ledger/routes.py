"""HTTP routes of the ledger: parse, authorise, call the rules, shape the response. No rules and no SQL here.

Charge, credit and balance are hot: their work is a plain function (`charge`, `credit`, `balance`) that the
edge's fast lane calls directly (`fast_routes`), and that the FastAPI route of the same path also calls.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from psycopg_pool import AsyncConnectionPool

from billing_service import metrics
from billing_service.edge.auth import Caller, ReaderCaller, ServiceCaller
from billing_service.edge.codec import Answer
from billing_service.edge.fast_lane import FastRoute
from billing_service.errors import AccountNotFound, ErrorBody, InsufficientBalance, InvalidRequest, documented
from billing_service.ledger import rules as ledger
from billing_service.ledger.batcher import ChargeBatcher
from billing_service.ledger.read_batcher import BalanceBatcher
from billing_service.ledger.schemas import (
    AccountResponse,
    AccountSettingsRequest,
    AccountSettingsResponse,
    AccountSummaryResponse,
    BalancePointResponse,
    BalanceResponse,
    BalanceSeriesResponse,
    CreditRequest,
    LedgerRequest,
    OpenAccountRequest,
    PostedResponse,
    TransactionResponse,
    UsageResponse,
)

router = APIRouter(prefix="/billing", tags=["billing"])
health = APIRouter(tags=["health"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retries with the same key and body return the first answer and never post twice.",
    ),
]


_DESCRIBED = {
    402: "Insufficient balance, or unknown account",
    404: "Account not found",
    409: "Concurrent request with the same Idempotency-Key",
    413: "Body too large",
    415: "Body not declared as JSON",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return documented({status: _DESCRIBED[status] for status in statuses})


def _pool(request: Request) -> AsyncConnectionPool:
    pool: AsyncConnectionPool = request.app.state.pool
    return pool


# The hot routes' work, shared by the FastAPI route (docs, and any request the fast lane hands over) and the
# fast lane (edge/fast_lane.py): one implementation, two ways in.


def _posted(posted: ledger.Posted) -> Answer:
    body = b'{"status":"success","transaction_id":"%s","balance":%d' % (
        str(posted.transaction_id).encode(),
        posted.balance,
    )
    if posted.grant_id is not None:
        body += b',"grant_id":"%s"' % str(posted.grant_id).encode()
    return Answer(200, body + b"}", posted.replayed)


async def charge(state: Any, _: None, body: LedgerRequest, idempotency_key: str | None, caller: Caller) -> Answer:
    state.limiter.check_user(body.user_id)
    batcher: ChargeBatcher | None = state.batcher
    post = batcher.charge if batcher is not None else partial(ledger.charge, state.pool)
    try:
        posted = await post(
            user_id=body.user_id,
            amount=body.amount,
            description=body.description,
            metadata=body.metadata,
            idempotency_key=idempotency_key,
            posted_by=caller.name,
            request_id=caller.request_id,
        )
    except (InsufficientBalance, AccountNotFound) as refused:
        metrics.record_charge(refused.code, body.amount)
        raise
    metrics.record_charge("replayed" if posted.replayed else "success", body.amount)
    return _posted(posted)


async def credit(state: Any, _: None, body: CreditRequest, idempotency_key: str | None, caller: Caller) -> Answer:
    state.limiter.check_user(body.user_id)
    posted = await ledger.credit(
        state.pool,
        user_id=body.user_id,
        amount=body.amount,
        description=body.description,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
        posted_by=caller.name,
        request_id=caller.request_id,
        terms=ledger.GrantTerms(priority=body.priority, category=body.category, expires_at=body.expires_at),
    )
    metrics.record_credit(body.amount, replayed=posted.replayed)
    return _posted(posted)


def _rfc3339(at: datetime) -> str:
    """As pydantic writes it (the FastAPI route of the same path): UTC as Z."""
    text = at.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


async def balance(state: Any, user_id: UUID, _: None, __: str | None, ___: Caller) -> Answer:
    batcher: BalanceBatcher | None = state.read_batcher
    if batcher is not None:
        current = await batcher.balance_with_holds(user_id=user_id)
    else:
        current = await ledger.balance_with_holds(state.pool, user_id=user_id)
    next_expiry = b'"%s"' % _rfc3339(current.next_expiry).encode() if current.next_expiry is not None else b"null"
    body = b'{"user_id":"%s","balance":%d,"held":%d,"available":%d,"expiring":%d,"next_expiry":%s}' % (
        str(user_id).encode(),
        current.balance,
        current.held,
        current.available,
        current.expiring,
        next_expiry,
    )
    return Answer(200, body)


fast_routes = [
    FastRoute("POST", "/billing/charge-tokens", "service", charge, LedgerRequest),
    FastRoute("POST", "/billing/credit-tokens", "service", credit, CreditRequest),
    FastRoute("GET", "/billing/balance/{user_id}", "reader", balance),
]


@router.post("/charge-tokens", response_model=PostedResponse, responses=_errors(402, 409, 413, 415))
async def charge_tokens(
    body: LedgerRequest, request: Request, caller: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> Response:
    """Debit tokens. Atomic: the balance never goes below 0, whatever the concurrency."""
    return (await charge(request.app.state, None, body, idempotency_key, caller)).response()


@router.post("/credit-tokens", response_model=PostedResponse, responses=_errors(409, 413, 415))
async def credit_tokens(
    body: CreditRequest, request: Request, caller: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> Response:
    """Credit tokens as a grant, opening the account if it does not exist yet. Optional expires_at, priority and
    category decide when its tokens are spent (lower priority first, then the earliest expiry, then the oldest)
    and when they leave the balance."""
    return (await credit(request.app.state, None, body, idempotency_key, caller)).response()


@router.post(
    "/accounts",
    response_model=AccountResponse,
    status_code=201,
    responses={200: {"model": AccountResponse, "description": "Already open"}, **_errors(413, 415)},
)
async def open_account(
    body: OpenAccountRequest, request: Request, _: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Open an account with balance 0; 200 with its current state if it is already open."""
    threshold = (
        {"low_balance_threshold": body.low_balance_threshold}
        if "low_balance_threshold" in body.model_fields_set
        else {}
    )
    account, created, replayed = await ledger.open_account(
        _pool(request), user_id=body.user_id, idempotency_key=idempotency_key, **threshold
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(
        {"user_id": str(account.user_id), "balance": account.balance},
        status_code=201 if created else 200,
        headers=headers,
    )


@router.patch("/accounts/{user_id}", response_model=AccountSettingsResponse, responses=_errors(404, 413, 415))
async def update_account(
    user_id: UUID, body: AccountSettingsRequest, request: Request, _: ServiceCaller
) -> AccountSettingsResponse:
    """Set the account's low-balance threshold (null: no alert). A new threshold re-arms balance.low."""
    updated = await ledger.set_low_balance_threshold(
        _pool(request), user_id=user_id, threshold=body.low_balance_threshold
    )
    return AccountSettingsResponse(
        user_id=user_id,
        balance=updated.balance,
        held=updated.held,
        available=updated.balance - updated.held,
        low_balance_threshold=updated.low_balance_threshold,
    )


@router.get(
    "/balance/{user_id}", response_model=BalanceResponse, response_model_exclude_none=True, responses=_errors(404)
)
async def get_balance(
    user_id: UUID,
    request: Request,
    caller: ReaderCaller,
    at: Annotated[
        datetime | None, Query(description="RFC 3339 time with offset: the posted balance at that moment.")
    ] = None,
    by: Annotated[Literal["category"] | None, Query(description="category: add available by grant category.")] = None,
) -> BalanceResponse | Response:
    """The balance (live tokens), what active holds reserve, what is available and what expires within 7 days;
    or, with `at`, the past balance."""
    if at is None and by is None:
        return (await balance(request.app.state, user_id, None, None, caller)).response()
    if at is None:
        current = await ledger.balance_with_holds(_pool(request), user_id=user_id)
        categories = await ledger.balance_by_category(_pool(request), user_id=user_id)
        return BalanceResponse(
            user_id=user_id,
            balance=current.balance,
            held=current.held,
            available=current.available,
            expiring=current.expiring,
            next_expiry=current.next_expiry,
            categories=categories,
        )
    if at.tzinfo is None:
        raise InvalidRequest("at: give a time zone offset, e.g. 2026-01-01T00:00:00Z.")
    posted = await ledger.balance_at(_pool(request), user_id=user_id, at=at)
    return BalanceResponse(user_id=user_id, balance=posted, at=at)


@router.get("/usage/{user_id}", response_model=UsageResponse, responses=_errors(404))
async def get_usage(
    user_id: UUID,
    request: Request,
    _: ReaderCaller,
    group_by: Annotated[
        Literal["run_id", "model", "day", "day,model"],
        Query(description="How to group the spend; `day,model` groups by both (the group is an object)."),
    ],
    since: Annotated[datetime | None, Query(description="Inclusive, RFC 3339.")] = None,
    until: Annotated[datetime | None, Query(description="Exclusive, RFC 3339.")] = None,
) -> Response:
    """Spend (debits and captures) per run, model, UTC day, or day and model, with token counts from the metadata."""
    _require_offsets(since=since, until=until)
    groups = await ledger.usage(_pool(request), user_id=user_id, group_by=group_by, since=since, until=until)
    body = f'{{"user_id":"{user_id}","group_by":"{group_by}","groups":[{",".join(groups)}]}}'
    return Response(body, media_type="application/json")


@router.get("/balance/{user_id}/series", response_model=BalanceSeriesResponse, responses=_errors(404))
async def get_balance_series(
    user_id: UUID,
    request: Request,
    _: ReaderCaller,
    since: Annotated[datetime | None, Query(description="Inclusive, RFC 3339.")] = None,
    until: Annotated[datetime | None, Query(description="Exclusive, RFC 3339.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="The newest this many points.")] = 1000,
) -> BalanceSeriesResponse:
    """The posted balance over time: `balance_after` of each ledger row (the newest `limit`), oldest first."""
    _require_offsets(since=since, until=until)
    points = await ledger.balance_series(_pool(request), user_id=user_id, since=since, until=until, limit=limit)
    return BalanceSeriesResponse(
        user_id=user_id, points=[BalancePointResponse(at=point.at, balance=point.balance) for point in points]
    )


@router.get("/accounts", response_model=list[AccountSummaryResponse], responses=_errors())
async def list_accounts(
    request: Request,
    _: ServiceCaller,
    user_id_prefix: Annotated[
        str | None, Query(max_length=36, description="Accounts whose user id starts with this (hex digits).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[AccountSummaryResponse]:
    """Accounts by user id prefix, or without one the most recently active accounts (services only)."""
    pool = _pool(request)
    found = (
        await ledger.find_accounts(pool, prefix=user_id_prefix, limit=limit)
        if user_id_prefix
        else await ledger.recent_accounts(pool, limit=limit)
    )
    return [
        AccountSummaryResponse(
            user_id=a.user_id, balance=a.balance, held=a.held, available=a.balance - a.held, updated_at=a.updated_at
        )
        for a in found
    ]


def _require_offsets(**times: datetime | None) -> None:
    for name, value in times.items():
        if value is not None and value.tzinfo is None:
            raise InvalidRequest(f"{name}: give a time zone offset, e.g. 2026-01-01T00:00:00Z.")


@router.get(
    "/transactions/{user_id}",
    response_model=list[TransactionResponse],
    responses={
        **_errors(404),
        200: {
            "description": 'Newest first. With `limit`, a `Link: <...>; rel="next"` header points to the next page.',
            "headers": {"Link": {"schema": {"type": "string"}, "description": "RFC 8288 link to the next page"}},
        },
    },
)
async def list_transactions(
    user_id: UUID,
    request: Request,
    _: ReaderCaller,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="Page size; omit for the whole history.")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="Opaque; from a Link header.")] = None,
    run_id: Annotated[str | None, Query(max_length=1000, description="Only rows with this metadata.run_id.")] = None,
    type: Annotated[
        Literal["debit", "credit", "capture", "expiry", "void", "refund"] | None,
        Query(description="Only rows of this type."),
    ] = None,
    since: Annotated[datetime | None, Query(description="Only rows at or after this RFC 3339 time.")] = None,
    until: Annotated[datetime | None, Query(description="Only rows before this RFC 3339 time.")] = None,
) -> Response:
    """The ledger, newest first. Without `limit` the whole history streams from a server-side cursor."""
    pool = _pool(request)
    _require_offsets(since=since, until=until)
    if run_id is not None and "\x00" in run_id:  # PostgreSQL text cannot hold it: a 422, not a 500
        raise InvalidRequest("run_id: must not contain the NUL character.")
    given = {"run_id": run_id, "type": type, "since": since, "until": until}
    filters = {name: value for name, value in given.items() if value is not None}
    if limit is None:
        if cursor is not None:
            limit = 1000
        else:
            chunks = await ledger.history_stream(pool, user_id=user_id, filters=filters)
            return StreamingResponse(chunks, media_type="application/json")
    rows, next_cursor = await ledger.history_page(pool, user_id=user_id, limit=limit, cursor=cursor, filters=filters)
    headers = {}
    if next_cursor is not None:
        next_url = request.url.include_query_params(limit=limit, cursor=next_cursor)
        headers["Link"] = f'<{next_url.path}?{next_url.query}>; rel="next"'
    return Response("[" + ",".join(rows) + "]", media_type="application/json", headers=headers)


@health.get("/healthz", responses={200: {"description": "The process is alive"}})
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", responses={200: {"description": "The database answers"}, 503: {"model": ErrorBody}})
async def readyz(request: Request) -> dict[str, str]:
    await ledger.ping(_pool(request))
    return {"status": "ready"}
