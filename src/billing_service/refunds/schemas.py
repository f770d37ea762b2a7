"""Refund bodies."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import BaseModel, Field

from billing_service.ledger.schemas import Amount, Description, Metadata, Strict


class RefundRequest(Strict):
    user_id: UUID = Field(
        description="The account the transaction belongs to; a transaction of another account is not found."
    )
    amount: Amount | None = Field(default=None, description="Tokens to give back; absent: all not yet refunded.")
    description: Description
    metadata: Metadata = None


class RefundResponse(BaseModel):
    status: Literal["success"] = "success"
    transaction_id: UUID = Field(description="The refund's own ledger row.")
    refund_of: UUID
    amount: int
    balance: int = Field(description="The balance after the refund.")
    refunded_total: int = Field(description="All refunds of the charge so far, this one included.")
