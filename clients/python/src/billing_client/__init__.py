"""billing-client: the typed Python client of billing_service, the token ledger of the agent platform.

>>> from billing_client import BillingClient, InsufficientBalance
>>> with BillingClient(base_url="http://billing:8000", token=token) as billing:
...     try:
...         billing.charge(user_id, 120, "run 42", metadata={"run_id": "42"})
...     except InsufficientBalance:
...         ...
"""

from billing_client._client import AsyncBillingClient, AsyncReservation, BillingClient, Reservation
from billing_client._config import DEFAULT_RETRY, DEFAULT_TIMEOUT, NO_RETRY, RetryPolicy
from billing_client._exceptions import (
    AccountNotFound,
    BillingError,
    ExpiresAtInPast,
    Forbidden,
    GrantNotFound,
    HoldLimitExceeded,
    HoldNotActive,
    HoldNotFound,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InsufficientBalance,
    InvalidRequest,
    NotRefundable,
    RefundExceedsCharge,
    ServiceUnavailable,
    TransactionNotFound,
    Unauthorized,
)
from billing_client._models import (
    Account,
    Captured,
    Funding,
    Grant,
    Hold,
    Posted,
    Refund,
    Transaction,
    TransactionPage,
    VoidedGrant,
)

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "Account",
    "AccountNotFound",
    "AsyncBillingClient",
    "AsyncReservation",
    "BillingClient",
    "BillingError",
    "Captured",
    "ExpiresAtInPast",
    "Forbidden",
    "Funding",
    "Grant",
    "GrantNotFound",
    "Hold",
    "HoldLimitExceeded",
    "HoldNotActive",
    "HoldNotFound",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "InsufficientBalance",
    "InvalidRequest",
    "NotRefundable",
    "Posted",
    "Refund",
    "RefundExceedsCharge",
    "Reservation",
    "RetryPolicy",
    "ServiceUnavailable",
    "Transaction",
    "TransactionNotFound",
    "TransactionPage",
    "Unauthorized",
    "VoidedGrant",
]
