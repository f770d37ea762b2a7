"""Grant bodies: what a grant looks like to a client, and what voiding one takes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, Field

from billing_service.ledger.schemas import Description, Strict


class GrantResponse(BaseModel):
    grant_id: UUID
    user_id: UUID
    amount: int = Field(description="What the credit granted.")
    remaining: int = Field(description="Left to draw now: 0 once expired or voided.")
    reserved: int = Field(description="Held for active holds; comes back to the grant if they do not capture it.")
    priority: int = Field(description="0..100; lower is spent first.")
    category: Literal["paid", "promotional"]
    expires_at: datetime | None
    created_at: datetime
    source: Literal["credit", "refund", "allowance", "opening"]
    voided_at: datetime | None = None


class VoidRequest(Strict):
    description: Description = "Grant voided"


class VoidResponse(BaseModel):
    grant: GrantResponse
    voided: int = Field(description="Tokens this void removed from the balance (0 on a repeat).")
    transaction_id: UUID | None = Field(description="The void's ledger row; null when nothing was left to remove.")
