"""Request and response bodies. Strict: an amount is a JSON integer, never a float, string or bool."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_AMOUNT = 2**53 - 1  # the largest integer every JSON client reads exactly
MAX_METADATA_BYTES = 4096


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000; refusing it here keeps it a 422 instead of a database error.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    return value


def _small_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    text = json.dumps(value, separators=(",", ":"))
    if "\\u0000" in text:
        raise ValueError("must not contain the NUL character")
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


Amount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT, description="Tokens, a JSON integer ≥ 1.")]
Description = Annotated[StrictStr, Field(min_length=1, max_length=1000), AfterValidator(_no_nul)]
Metadata = Annotated[
    dict[str, Any] | None,
    Field(description="Usage provenance (run_id, model, input_tokens, ...); at most 4 KiB as JSON."),
    AfterValidator(_small_json),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LedgerRequest(_Strict):
    user_id: UUID
    amount: Amount
    description: Description
    metadata: Metadata = None


class OpenAccountRequest(_Strict):
    user_id: UUID


class PostedResponse(BaseModel):
    status: Literal["success"] = "success"
    transaction_id: UUID
    balance: int = Field(description="The balance after this transaction.")


class AccountResponse(BaseModel):
    user_id: UUID
    balance: int


class TransactionResponse(BaseModel):
    id: UUID
    user_id: UUID
    amount: int = Field(description="Signed: debits negative, credits positive.")
    description: str
    created_at: datetime
    type: Literal["debit", "credit"]
    balance_after: int
    metadata: dict[str, Any] | None = None
