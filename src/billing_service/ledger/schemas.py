"""Request and response bodies. Strict: an amount is a JSON integer, never a float, string or bool."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import pydantic
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_AMOUNT = 2**53 - 1  # the largest integer every JSON client reads exactly
MAX_METADATA_BYTES = 4096
USAGE_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_tokens")


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000; refusing it here keeps it a 422 instead of a database error.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    return value


def _small_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        # Python's json takes NaN, Infinity and unpaired surrogates; PostgreSQL's jsonb refuses all three,
        # so refuse them here as a 422 rather than fail in the database as a 500.
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError("must be JSON PostgreSQL can store: no NaN, Infinity or unpaired surrogates") from exc
    if b"\\u0000" in text:
        raise ValueError("must not contain the NUL character")
    if len(text) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    # The usage rollup groups and sums these: a wrong type here would be a wrong chart later.
    for key in ("run_id", "model"):
        if key in value and not isinstance(value[key], str):
            raise ValueError(f"{key} must be a string")
    for key in USAGE_TOKEN_FIELDS:
        count = value.get(key)
        if key in value and (type(count) is not int or not 0 <= count <= MAX_AMOUNT):
            raise ValueError(f"{key} must be an integer from 0 to {MAX_AMOUNT}")
    return value


Amount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT, description="Tokens, a JSON integer ≥ 1.")]
Description = Annotated[StrictStr, Field(min_length=1, max_length=1000), AfterValidator(_no_nul)]
Metadata = Annotated[
    dict[str, Any] | None,
    Field(description="Usage provenance (run_id, model, input_tokens, ...); at most 4 KiB as JSON."),
    AfterValidator(_small_json),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LedgerRequest(Strict):
    user_id: UUID
    amount: Amount
    description: Description
    metadata: Metadata = None


# "In the future" is checked by the credit itself, after its Idempotency-Key: a retry of a credit whose grant
# has expired since must still replay (ledger/sql.py CREDIT).
ExpiresAt = Annotated[
    AwareDatetime | None,
    pydantic.Strict(),
    Field(description="RFC 3339 with an offset, in the future. The grant's unspent tokens leave the balance then."),
]
Priority = Annotated[StrictInt, Field(ge=0, le=100, description="0..100; lower is spent first.")]
Category = Literal["paid", "promotional"]


class CreditRequest(LedgerRequest):
    """A credit is a grant. Without expires_at, priority and category it is what every credit always was:
    paid tokens that never expire, spent after anything of a lower priority or an earlier expiry."""

    expires_at: ExpiresAt = None
    priority: Priority = 50
    category: Category = "paid"


Threshold = Annotated[
    StrictInt | None,
    Field(ge=0, le=MAX_AMOUNT, description="balance.low fires when available falls below it; null: no alert."),
]


class OpenAccountRequest(Strict):
    user_id: UUID
    low_balance_threshold: Threshold = Field(
        default=None, description="Absent: the service's default (BILLING_LOW_BALANCE_THRESHOLD); null: no alert."
    )


class AccountSettingsRequest(Strict):
    low_balance_threshold: Threshold


class AccountSettingsResponse(BaseModel):
    user_id: UUID
    balance: int
    held: int
    available: int
    low_balance_threshold: int | None


class PostedResponse(BaseModel):
    status: Literal["success"] = "success"
    transaction_id: UUID
    balance: int = Field(description="The balance after this transaction.")
    grant_id: UUID | None = Field(default=None, description="A credit's: the grant it created.")


class AccountResponse(BaseModel):
    user_id: UUID
    balance: int


class Funding(BaseModel):
    grant_id: UUID
    amount: int = Field(description="Tokens, unsigned: the row's sign says which way they moved.")


class TransactionResponse(BaseModel):
    id: UUID
    user_id: UUID
    amount: int = Field(description="Signed: debits negative, credits positive.")
    description: str
    created_at: datetime
    type: Literal["debit", "credit", "capture", "expiry", "void", "refund"]
    balance_after: int
    metadata: dict[str, Any] | None = None
    hold_id: UUID | None = Field(default=None, description="The hold a capture drew on.")
    funding: list[Funding] | None = Field(
        default=None, description="The grants this row drew from (debits, captures) or paid into (credits, refunds)."
    )
    grant_id: UUID | None = Field(default=None, description="The grant a credit created, or an expiry/void closed.")
    refund_of: UUID | None = Field(default=None, description="A refund's: the transaction it refunds.")
    posted_by: str | None = Field(
        default=None, description="The service token's name (or `cli:<user>`); null for rows before the trail."
    )
    request_id: str | None = Field(default=None, description="The X-Request-ID of the request that posted it.")


class BalanceResponse(BaseModel):
    user_id: UUID
    balance: int = Field(description="The posted balance: the sum of the ledger.")
    held: int | None = Field(default=None, description="Reserved by active holds (absent with ?at=).")
    available: int | None = Field(default=None, description="balance - held: what a charge or hold may take.")
    expiring: int | None = Field(default=None, description="Live tokens whose grant expires within 7 days.")
    next_expiry: datetime | None = Field(default=None, description="The soonest expiry of a live grant.")
    categories: dict[Category, int] | None = Field(
        default=None, description="With ?by=category: available tokens by grant category."
    )
    at: datetime | None = Field(default=None, description="With ?at=: the time the balance is given for.")


class UsageGroup(BaseModel):
    group: str | dict[str, str | None] | None = Field(
        description="The run_id, model or UTC day; null for spend without one. With day,model: {day, model}."
    )
    tokens: int = Field(description="Tokens spent (debits and captures).")
    transactions: int
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    first_at: datetime
    last_at: datetime


class UsageResponse(BaseModel):
    user_id: UUID
    group_by: Literal["run_id", "model", "day", "day,model"]
    groups: list[UsageGroup]


class BalancePointResponse(BaseModel):
    at: datetime
    balance: int


class BalanceSeriesResponse(BaseModel):
    user_id: UUID
    points: list[BalancePointResponse]


class AccountSummaryResponse(BaseModel):
    user_id: UUID
    balance: int
    held: int
    available: int
    updated_at: datetime
