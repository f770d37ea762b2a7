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
    Forbidden,
    HoldLimitExceeded,
    HoldNotActive,
    HoldNotFound,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InsufficientBalance,
    InvalidRequest,
    ServiceUnavailable,
    Unauthorized,
)
from billing_client._models import Account, Captured, Hold, Posted, Transaction, TransactionPage

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
    "Forbidden",
    "Hold",
    "HoldLimitExceeded",
    "HoldNotActive",
    "HoldNotFound",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "InsufficientBalance",
    "InvalidRequest",
    "Posted",
    "Reservation",
    "RetryPolicy",
    "ServiceUnavailable",
    "Transaction",
    "TransactionPage",
    "Unauthorized",
]
