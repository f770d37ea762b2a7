"""The one error tree. Every failure a client can see is a `BillingError` with a status and a machine code.

BillingError
├── Unauthorized            401 unauthorized / invalid_token
├── Forbidden               403 forbidden
│   └── InsufficientScope   403 insufficient_scope (a service token without the route's scope)
├── AccountNotFound         404 account_not_found (402 on a charge, as the seed says)
├── NotFound                404 not_found / webhook_not_found
├── HoldNotFound            404 hold_not_found
├── HoldNotActive           409 hold_not_active (captured, released or expired)
├── CaptureExceedsHold      409 capture_exceeds_hold (more than remaining, without allow_overrun)
├── ChildExceedsParent      409 child_exceeds_parent (a child larger than its parent's remaining)
├── HoldDepthLimit          409 hold_depth_limit (children nest at most 8 levels)
├── InsufficientBalance     402 insufficient_balance
├── IdempotencyKeyReused    422 idempotency_key_reused
├── IdempotencyConflict     409 idempotency_conflict
├── InvalidRequest          422 validation_error / invalid_cursor / invalid_idempotency_key / unknown_event_type /
│                               webhook_url_invalid / webhook_url_not_allowed (SSRF) / invalid_replay / ...
├── BalanceLimitExceeded    422 balance_limit_exceeded
├── PayloadTooLarge         413 payload_too_large
├── RateLimited             429 rate_limited (with Retry-After; before any database work)
├── AuthUnavailable         503 auth_unavailable (the JWKS endpoint cannot be reached; with Retry-After)
├── DatabaseUnavailable     503 database_unavailable (with Retry-After)
├── CommitNotReplicated     503 commit_not_replicated (with Retry-After; also a psycopg.OperationalError)
└── TokenNameTaken          409 token_name_taken (callers/rules.py; token names are unique, env and DB)

Domain code raises these; `install_error_handlers` turns them, and FastAPI's own validation and HTTP
errors, into `{"detail": ..., "code": ...}`. Anything else is a bug: 500 internal_error, same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException


class BillingError(Exception):
    status_code = 400
    code = "bad_request"
    detail = "Bad request."

    def __init__(self, detail: str | None = None, *, code: str | None = None, status_code: int | None = None) -> None:
        self.detail = detail or self.detail
        self.code = code or self.code
        self.status_code = status_code or self.status_code
        super().__init__(self.detail)

    def headers(self) -> dict[str, str] | None:
        return None


class Unauthorized(BillingError):
    status_code = 401
    code = "unauthorized"
    detail = "Missing bearer token."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(BillingError):
    status_code = 403
    code = "forbidden"
    detail = "This token may not do that."


class InsufficientScope(Forbidden):
    code = "insufficient_scope"
    detail = "This token lacks the scope this route needs."


class NotFound(BillingError):
    status_code = 404
    code = "not_found"
    detail = "Not found."


class HoldNotFound(BillingError):
    status_code = 404
    code = "hold_not_found"
    detail = "No such hold."


class TransactionNotFound(BillingError):
    status_code = 404
    code = "transaction_not_found"
    detail = "No such transaction on this account."


class NotRefundable(BillingError):
    status_code = 422
    code = "not_refundable"
    detail = "Only a debit or a capture can be refunded."


class RefundExceedsCharge(BillingError):
    status_code = 409
    code = "refund_exceeds_charge"
    detail = "Refunds of a charge never add up to more than the charge."


class HoldNotActive(BillingError):
    status_code = 409
    code = "hold_not_active"
    detail = "The hold is no longer active."


class CaptureExceedsHold(BillingError):
    status_code = 409
    code = "capture_exceeds_hold"
    detail = "The capture exceeds the hold's remaining amount; allow_overrun takes the excess from available."


class ChildExceedsParent(BillingError):
    status_code = 409
    code = "child_exceeds_parent"
    detail = "The child budget is larger than the parent hold's remaining amount."


class HoldDepthLimit(BillingError):
    status_code = 409
    code = "hold_depth_limit"
    detail = "Holds nest at most 8 levels deep."


class AccountNotFound(BillingError):
    status_code = 404
    code = "account_not_found"
    detail = "No account for this user."


class InsufficientBalance(BillingError):
    status_code = 402
    code = "insufficient_balance"
    detail = "The available balance is too low for this amount."


class IdempotencyKeyReused(BillingError):
    status_code = 422
    code = "idempotency_key_reused"
    detail = "This Idempotency-Key was already used with a different request."


class IdempotencyConflict(BillingError):
    status_code = 409
    code = "idempotency_conflict"
    detail = "A request with this Idempotency-Key is in flight; retry shortly."


class InvalidRequest(BillingError):
    status_code = 422
    code = "validation_error"
    detail = "The request is not valid."


class BalanceLimitExceeded(BillingError):
    status_code = 422
    code = "balance_limit_exceeded"
    detail = "This credit would take the balance past the largest amount the ledger holds."


class PayloadTooLarge(BillingError):
    status_code = 413
    code = "payload_too_large"
    detail = "The request body is too large."


class DatabaseUnavailable(BillingError):
    status_code = 503
    code = "database_unavailable"
    detail = "The database is unavailable; retry shortly."

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class CommitNotReplicated(BillingError, psycopg.OperationalError):
    """PostgreSQL committed the write locally but the synchronous standby never confirmed it (the wait for it
    was cancelled: the standby is gone, or the wait was interrupted). PostgreSQL reports that with a warning,
    not an error, so `db.BillingPool` watches for it. Not acknowledged: after a failover the write may not exist.
    The client retries with the same Idempotency-Key: it replays once the write is replicated, and posts it
    afresh if a failover lost it.

    Also a psycopg.OperationalError, so every handler of a lost database (the batcher's among them) treats it
    as one: nothing is acknowledged and nothing is retried on another path. FastAPI's handler lookup follows
    the MRO, so it answers as a BillingError, with its own code.
    """

    status_code = 503
    code = "commit_not_replicated"
    detail = (
        "The write committed on the primary but its synchronous standby did not confirm it; it is not "
        "acknowledged. Retry with the same Idempotency-Key."
    )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class RateLimited(BillingError):
    status_code = 429
    code = "rate_limited"
    detail = "Too many writes; retry after Retry-After seconds."

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class AuthUnavailable(BillingError):
    status_code = 503
    code = "auth_unavailable"
    detail = "The identity provider's keys cannot be fetched; retry shortly."

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class ErrorBody(BaseModel):
    """What every error response carries."""

    detail: str
    code: str


# The answers every authenticated route may give, whatever it does.
_EVERY_ROUTE = {
    401: "Missing or invalid token",
    403: "Token may not do this",
    422: "Invalid request",
    503: "Database unavailable; retry after Retry-After",
}


def documented(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for OpenAPI: its own error answers (which may reword a common one) plus the
    answers every route may give, each with the {detail, code} body."""
    return {status: {"model": ErrorBody, "description": text} for status, text in {**_EVERY_ROUTE, **described}.items()}


# Connection refused, connection lost, pool exhausted, statement timeout: all retryable, all 503.
DATABASE_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def as_billing_error(exc: Exception) -> BillingError | None:
    """The client-facing error an exception means, or None for a bug (500)."""
    if isinstance(exc, BillingError):
        return exc
    if isinstance(exc, DATABASE_DOWN):
        return DatabaseUnavailable()
    return None


def error_response(status_code: int, detail: str, code: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status_code, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limited",
    415: "unsupported_media_type",
    422: "validation_error",
}


def _describe_validation(errors: list[Any]) -> str:
    parts = []
    for error in errors[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "The request is not valid."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BillingError)
    async def _billing_error(_: Request, exc: BillingError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.code, exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # Garbage JSON is a syntax problem, not a schema problem: say so with its own code.
        if any(error.get("type") == "json_invalid" for error in errors):
            return error_response(422, "The body is not valid JSON.", "invalid_json")
        return error_response(422, _describe_validation(errors), "validation_error")

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg.InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        unavailable = DatabaseUnavailable()
        return error_response(unavailable.status_code, unavailable.detail, unavailable.code, unavailable.headers())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI answers a body that is not UTF-8 with an undocumented 400; it is unparseable JSON like
            # any other, so it gets the same documented 422 invalid_json.
            return error_response(422, "The body is not valid UTF-8 JSON.", "invalid_json")
        if exc.status_code == 400 and isinstance(exc.__cause__, (RecursionError, ValueError)):
            # Likewise JSON that Python's parser gives up on: nested too deep, or an integer too long to read.
            return error_response(422, "The body is JSON this service cannot read.", "invalid_json")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return error_response(exc.status_code, detail, code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, and the server still logs it with its traceback (Starlette re-raises after this answer);
        # the client still gets the documented shape, and never a stack trace or a plain-text page.
        return error_response(500, "Internal error.", "internal_error")
