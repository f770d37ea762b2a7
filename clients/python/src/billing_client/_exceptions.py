"""Every way a call to billing_service can fail, as one tree rooted at `BillingError`.

BillingError                    code, status (None when no response arrived), detail
├── InsufficientBalance         402 insufficient_balance: the balance does not cover the charge
├── AccountNotFound             404 (402 on a charge) account_not_found: the user has no account
├── IdempotencyConflict         409 idempotency_conflict: a twin request with this key is still in flight
│   └── IdempotencyKeyReused    422 idempotency_key_reused: this key was used with a different body
├── Unauthorized                401 unauthorized / invalid_token: missing, unknown or expired token
├── Forbidden                   403 forbidden: the token may not do this (a user JWT writing, say)
├── HoldNotFound                404 hold_not_found: no such hold (or not yours)
├── HoldNotActive               409 hold_not_active: the hold was captured, released or has expired
├── HoldLimitExceeded           409 capture_exceeds_hold / child_exceeds_parent / hold_depth_limit
├── GrantNotFound               404 grant_not_found: no such grant
├── TransactionNotFound         404 transaction_not_found: no such transaction on this account
├── RefundExceedsCharge         409 refund_exceeds_charge: more than is left to refund of the charge
├── NotRefundable               422 not_refundable: only a debit or a capture can be refunded
├── InvalidRequest              other 4xx: validation_error, invalid_cursor, payload_too_large, ...
│   └── ExpiresAtInPast         422 expires_at_in_past: a credit's expires_at is not in the future
└── ServiceUnavailable          502/503/504/429, or no response at all, after every retry was spent

Only `ServiceUnavailable` is ever retried (inside the client, before it is raised). A 4xx is an answer,
never retried: retrying a refused charge cannot make it succeed.
"""

from __future__ import annotations

from typing import Any


class BillingError(Exception):
    """A call failed. `code` is the service's machine code; `status` the HTTP status, if any arrived."""

    def __init__(self, detail: str, *, code: str, status: int | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r}, code={self.code!r}, status={self.status!r})"


class InsufficientBalance(BillingError):
    """The balance does not cover the charge. Nothing was debited."""


class AccountNotFound(BillingError):
    """The user has no account. Open one (or credit, which opens it) first."""


class IdempotencyConflict(BillingError):
    """Another request with the same Idempotency-Key is in flight; its outcome is not known yet."""


class IdempotencyKeyReused(IdempotencyConflict):
    """The Idempotency-Key was already used with a different request body."""


class Unauthorized(BillingError):
    """The token is missing, unknown or expired."""


class Forbidden(BillingError):
    """The token is valid but may not do this."""


class HoldNotFound(BillingError):
    """No such hold, or it belongs to another user."""


class HoldNotActive(BillingError):
    """The hold was already captured in full, released, or has expired."""


class HoldLimitExceeded(BillingError):
    """A capture larger than the hold's remaining, a child larger than its parent, or nesting too deep."""


class GrantNotFound(BillingError):
    """No such grant."""


class TransactionNotFound(BillingError):
    """No such transaction on this account (a transaction of another account is not found either)."""


class RefundExceedsCharge(BillingError):
    """The refund is larger than what is left to refund of the charge. Nothing was refunded."""


class NotRefundable(BillingError):
    """The transaction is not a debit or a capture (a credit, say), so it cannot be refunded."""


class InvalidRequest(BillingError):
    """The service refused the request as malformed; fix the call, retrying will not help."""


class ExpiresAtInPast(InvalidRequest):
    """A credit's `expires_at` is not in the future. Nothing was credited."""


class ServiceUnavailable(BillingError):
    """The service could not be reached or stayed unavailable through every retry."""


_BY_CODE: dict[str, type[BillingError]] = {
    "insufficient_balance": InsufficientBalance,
    "account_not_found": AccountNotFound,
    "idempotency_conflict": IdempotencyConflict,
    "idempotency_key_reused": IdempotencyKeyReused,
    "unauthorized": Unauthorized,
    "invalid_token": Unauthorized,
    "forbidden": Forbidden,
    "hold_not_found": HoldNotFound,
    "hold_not_active": HoldNotActive,
    "capture_exceeds_hold": HoldLimitExceeded,
    "child_exceeds_parent": HoldLimitExceeded,
    "hold_depth_limit": HoldLimitExceeded,
    "grant_not_found": GrantNotFound,
    "transaction_not_found": TransactionNotFound,
    "refund_exceeds_charge": RefundExceedsCharge,
    "not_refundable": NotRefundable,
    "expires_at_in_past": ExpiresAtInPast,
}


def error_from_response(status: int, body: Any) -> BillingError:
    """The typed error for an error response whose body is `{"detail", "code"}` (or anything else)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    code = body.get("code") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        detail = f"HTTP {status}"
    if not isinstance(code, str):
        code = "http_error"
    error_class = _BY_CODE.get(code)
    if error_class is None:
        if status == 401:
            error_class = Unauthorized
        elif status == 403:
            error_class = Forbidden
        elif 400 <= status < 500:
            error_class = InvalidRequest
        elif status in (429, 502, 503, 504):
            error_class = ServiceUnavailable
        else:
            error_class = BillingError
    return error_class(detail, code=code, status=status)
