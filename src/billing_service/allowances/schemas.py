"""Allowance bodies: what creating one takes, and what one looks like to a client."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Annotated, Literal
from uuid import UUID
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from billing_service.ledger.schemas import MAX_AMOUNT, Amount, Category, Description, Priority, Strict

ANCHOR_RANGE = timedelta(days=100 * 366)


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _known_zone(value: str) -> str:
    if value not in _zones():
        raise ValueError("must be an IANA time zone name, e.g. UTC or America/Sao_Paulo")
    return value


def _near(value: datetime) -> datetime:
    # Period arithmetic runs a period either side of now and of the anchor: keep it far from datetime's limits.
    if abs(value - datetime.now(UTC)) > ANCHOR_RANGE:
        raise ValueError("must be within 100 years of now")
    return value


TimeZone = Annotated[
    StrictStr,
    Field(max_length=64, description="An IANA time zone name; periods follow its calendar and its DST."),
    AfterValidator(_known_zone),
]


def _text(value: object) -> object:
    # Not a number: a Unix time would pass as an aware datetime, but the contract is RFC 3339 with an offset.
    if not isinstance(value, str | datetime):
        raise ValueError("must be an RFC 3339 date-time with an offset")
    return value


Anchor = Annotated[
    AwareDatetime,
    BeforeValidator(_text),
    AfterValidator(_near),
    Field(description="RFC 3339 with an offset: periods start at anchor + k periods on the time zone's calendar."),
]
RolloverCap = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT, description="Most tokens that roll over.")]


class AllowanceRequest(Strict):
    """An allowance grants `amount` at the start of every period; each grant expires when its period ends."""

    user_id: UUID
    amount: Amount
    period: Literal["day", "week", "month"]
    timezone: TimeZone = "UTC"
    anchor: Anchor | None = Field(
        default=None,
        description="Absent: the start of the current calendar period (midnight; Monday midnight; the 1st).",
    )
    rollover: StrictBool = False
    rollover_cap: RolloverCap | None = Field(
        default=None,
        description="With rollover only; absent: one period's amount. A period grants amount + min(left, cap).",
    )
    priority: Priority = 50
    category: Category = "promotional"
    description: Description | None = None

    @model_validator(mode="after")
    def _rollover_terms(self) -> AllowanceRequest:
        if self.rollover_cap is not None and not self.rollover:
            raise ValueError("rollover_cap needs rollover: true")
        cap = self.amount if self.rollover_cap is None else self.rollover_cap
        if self.rollover and self.amount + cap > MAX_AMOUNT:
            raise ValueError(f"amount + rollover_cap must be at most {MAX_AMOUNT}")
        return self


class PeriodResponse(BaseModel):
    period_start: datetime
    period_end: datetime = Field(description="The next period's start; the period's grant expires then.")
    amount: int = Field(description="What the period granted: the allowance's amount plus what rolled over.")
    rolled_over: int
    grant_id: UUID | None = Field(description="Null only while the period's credit is being posted.")


class AllowanceResponse(BaseModel):
    allowance_id: UUID
    user_id: UUID
    amount: int
    period: Literal["day", "week", "month"]
    timezone: str
    anchor: datetime
    rollover: bool
    rollover_cap: int = Field(description="0 without rollover.")
    priority: int
    category: Literal["paid", "promotional"]
    description: str
    created_at: datetime
    stopped_at: datetime | None = Field(description="Set by DELETE: no period starting later is granted.")
    next_grant_at: datetime | None = Field(description="When the next period is granted; null once stopped.")
    latest_period: PeriodResponse | None = Field(description="The most recent period granted.")
