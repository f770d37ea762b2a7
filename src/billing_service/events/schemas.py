"""Request and response bodies of the events feed and webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field, StrictStr

from billing_service.ledger.schemas import Strict

EventType = Literal[
    "transaction.posted",
    "balance.low",
    "balance.depleted",
    "hold.created",
    "hold.captured",
    "hold.released",
    "hold.expired",
    "grant.expired",
    "refund.posted",
]


class WebhookRequest(Strict):
    url: Annotated[StrictStr, Field(min_length=1, max_length=2000, description="https:// URL that receives POSTs.")]
    events: Annotated[
        list[StrictStr],
        Field(min_length=1, max_length=20, description='Event types to receive, or ["*"] for all of them.'),
    ]
    description: Annotated[StrictStr | None, Field(max_length=1000)] = None


class WebhookResponse(BaseModel):
    id: UUID
    url: str
    events: list[str]
    description: str | None
    created_at: datetime
    updated_at: datetime
    previous_secret_expires_at: datetime | None = Field(
        description="Until then, deliveries are also signed with the secret before the last rotation."
    )
    secret: str | None = Field(
        default=None, description="whsec_...: shown only in the answers to create and rotate-secret."
    )


class ReplayRequest(Strict):
    since: datetime | None = Field(default=None, description="Inclusive, RFC 3339 with offset.")
    until: datetime | None = Field(default=None, description="Exclusive, RFC 3339 with offset.")
    event_ids: Annotated[list[UUID] | None, Field(max_length=1000)] = None


class ReplayResponse(BaseModel):
    replayed: int = Field(description="Deliveries made pending again (or created).")


class EventResponse(BaseModel):
    id: UUID = Field(description="Also the webhook-id header of its deliveries.")
    type: EventType
    user_id: UUID
    seq: int = Field(description="The event's position in its account's order, from 1, without gaps.")
    created_at: datetime
    data: dict[str, Any]


class AttemptResponse(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    latency_ms: float


class DeliveryResponse(BaseModel):
    id: UUID
    event_id: UUID
    event_type: EventType
    user_id: UUID
    event_seq: int
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_latency_ms: float | None
    created_at: datetime
    updated_at: datetime
    attempt_log: list[AttemptResponse]
