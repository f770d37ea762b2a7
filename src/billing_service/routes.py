"""HTTP routes: parse, authorise, call the ledger, shape the response. No rules and no SQL here."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from psycopg_pool import AsyncConnectionPool

from billing_service import ledger
from billing_service.auth import ReaderCaller, ServiceCaller
from billing_service.errors import ErrorBody
from billing_service.schemas import (
    AccountResponse,
    LedgerRequest,
    OpenAccountRequest,
    PostedResponse,
    TransactionResponse,
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


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {401: "Missing or invalid token", 403: "Token may not do this", 422: "Invalid request"}
    described.update(
        {
            402: "Insufficient balance, or unknown account",
            404: "Account not found",
            409: "Concurrent request with the same Idempotency-Key",
            413: "Body too large",
            503: "Database unavailable; retry after Retry-After",
        }
    )
    return {
        status: {"model": ErrorBody, "description": described[status]} for status in (401, 403, 422, 503, *statuses)
    }


def _pool(request: Request) -> AsyncConnectionPool:
    pool: AsyncConnectionPool = request.app.state.pool
    return pool


def _posted(posted: ledger.Posted) -> JSONResponse:
    body = {"status": "success", "transaction_id": str(posted.transaction_id), "balance": posted.balance}
    headers = {"Idempotent-Replayed": "true"} if posted.replayed else None
    return JSONResponse(body, headers=headers)


@router.post("/charge-tokens", response_model=PostedResponse, responses=_errors(402, 409, 413))
async def charge_tokens(
    body: LedgerRequest, request: Request, _: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Debit tokens. Atomic: the balance never goes below 0, whatever the concurrency."""
    posted = await ledger.charge(
        _pool(request),
        user_id=body.user_id,
        amount=body.amount,
        description=body.description,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
    )
    return _posted(posted)


@router.post("/credit-tokens", response_model=PostedResponse, responses=_errors(409, 413))
async def credit_tokens(
    body: LedgerRequest, request: Request, _: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Credit tokens, opening the account if it does not exist yet."""
    posted = await ledger.credit(
        _pool(request),
        user_id=body.user_id,
        amount=body.amount,
        description=body.description,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
    )
    return _posted(posted)


@router.post(
    "/accounts",
    response_model=AccountResponse,
    status_code=201,
    responses={200: {"model": AccountResponse, "description": "Already open"}, **_errors(413)},
)
async def open_account(
    body: OpenAccountRequest, request: Request, _: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Open an account with balance 0; 200 with its current state if it is already open."""
    account, created, replayed = await ledger.open_account(
        _pool(request), user_id=body.user_id, idempotency_key=idempotency_key
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(
        {"user_id": str(account.user_id), "balance": account.balance},
        status_code=201 if created else 200,
        headers=headers,
    )


@router.get("/balance/{user_id}", response_model=AccountResponse, responses=_errors(404))
async def get_balance(user_id: UUID, request: Request, _: ReaderCaller) -> AccountResponse:
    account = await ledger.balance(_pool(request), user_id=user_id)
    return AccountResponse(user_id=account.user_id, balance=account.balance)


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
) -> Response:
    """The ledger, newest first. Without `limit` the whole history streams from a server-side cursor."""
    pool = _pool(request)
    if limit is None:
        if cursor is not None:
            limit = 1000
        else:
            chunks = await ledger.history_stream(pool, user_id=user_id)
            return StreamingResponse(chunks, media_type="application/json")
    rows, next_cursor = await ledger.history_page(pool, user_id=user_id, limit=limit, cursor=cursor)
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
