"""Hold request and response bodies; the field types (strict amounts, descriptions, metadata) are the ledger's."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field, StrictBool, StrictInt

from billing_service.ledger.schemas import Amount, Description, Metadata, Strict

MAX_HOLD_TTL_SECONDS = 86_400
TtlSeconds = Annotated[
    StrictInt, Field(ge=1, le=MAX_HOLD_TTL_SECONDS, description="Lease length in seconds (at most 86,400).")
]
HoldStatus = Literal["active", "captured", "released", "expired"]


class HoldRequest(Strict):
    user_id: UUID
    amount: Amount
    description: Description
    ttl_seconds: TtlSeconds = 900
    metadata: Metadata = None


class ChildHoldRequest(Strict):
    amount: Amount
    description: Description
    ttl_seconds: TtlSeconds = 900
    metadata: Metadata = None


class CaptureRequest(Strict):
    amount: Amount
    description: Description | None = None
    metadata: Metadata = None
    final: StrictBool = Field(default=False, description="Capture, then release whatever the hold still reserves.")
    allow_overrun: StrictBool = Field(
        default=False, description="Take any excess over the hold's remaining from the available balance."
    )


class ExtendRequest(Strict):
    ttl_seconds: TtlSeconds


class HoldResponse(BaseModel):
    hold_id: UUID
    user_id: UUID
    parent_id: UUID | None = None
    depth: int = Field(description="1 for a hold on the balance, 2 for its children, and so on (at most 8).")
    amount: int = Field(description="Tokens reserved when the hold was made.")
    remaining: int = Field(description="Tokens this hold may still capture or carve into children.")
    captured: int = Field(description="Tokens captured through this hold itself.")
    status: HoldStatus
    expires_at: datetime
    description: str
    metadata: dict[str, Any] | None = None
    created_at: datetime


class HoldTreeResponse(HoldResponse):
    subtree_captured: int = Field(description="Tokens captured through this hold and all holds below it.")
    subtree_remaining: int = Field(description="Tokens still reserved by this hold and all holds below it.")
    children: list[HoldTreeResponse] = Field(default_factory=list)


class CaptureResponse(BaseModel):
    status: Literal["success"] = "success"
    transaction_id: UUID
    balance: int = Field(description="The posted balance after this capture.")
    hold: HoldResponse
