"""HTTP routes for allowances: parse, authorise, call `allowances`, shape the response. No rules and no SQL."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from billing_service.allowances import rules as allowances
from billing_service.allowances.schemas import AllowanceRequest, AllowanceResponse, PeriodResponse
from billing_service.edge.auth import AnyCaller, ReaderCaller, ServiceCaller, authorize_reader
from billing_service.errors import documented
from billing_service.ledger.routes import IdempotencyKey, _pool

router = APIRouter(prefix="/billing/allowances", tags=["allowances"])


_DESCRIBED = {
    404: "No such allowance",
    409: "Concurrent request with the same Idempotency-Key",
    413: "Body too large",
    415: "Body not declared as JSON",
    422: "Invalid request (a bad period, time zone, anchor or amount)",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return documented({status: _DESCRIBED[status] for status in (422, *statuses)})


def _view(allowance: allowances.Allowance) -> AllowanceResponse:
    latest = allowance.latest_period
    return AllowanceResponse(
        allowance_id=allowance.allowance_id,
        user_id=allowance.user_id,
        amount=allowance.amount,
        period=allowance.period,
        timezone=allowance.timezone,
        anchor=allowance.anchor,
        rollover=allowance.rollover,
        rollover_cap=allowance.rollover_cap,
        priority=allowance.priority,
        category=allowance.category,
        description=allowance.description,
        created_at=allowance.created_at,
        stopped_at=allowance.stopped_at,
        next_grant_at=None if allowance.stopped_at is not None else allowance.next_period_at,
        latest_period=PeriodResponse(**latest.__dict__) if latest is not None else None,
    )


def _answer(allowance: allowances.Allowance, *, replayed: bool = False, status_code: int = 200) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(_view(allowance).model_dump(mode="json"), status_code=status_code, headers=headers)


@router.post(
    "",
    response_model=AllowanceResponse,
    status_code=201,
    responses={
        200: {"model": AllowanceResponse, "description": "A retry with the same Idempotency-Key: the first answer"},
        **_errors(409, 413, 415),
    },
)
async def create_allowance(
    body: AllowanceRequest, request: Request, caller: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Grant `amount` at the start of every period (day, week or month, on the calendar of `timezone`); each
    grant expires when its period ends. The current period is granted at once. With `rollover`, a period also
    grants what the previous period's grant had left when it expired, up to `rollover_cap` (default: one
    period's amount); tokens that holds had reserved do not roll. A period is never granted twice."""
    allowance, replayed = await allowances.create_allowance(
        _pool(request),
        user_id=body.user_id,
        amount=body.amount,
        period=body.period,
        timezone=body.timezone,
        anchor=body.anchor,
        rollover=body.rollover,
        rollover_cap=body.rollover_cap,
        priority=body.priority,
        category=body.category,
        description=body.description,
        idempotency_key=idempotency_key,
        posted_by=caller.name,
    )
    return _answer(allowance, replayed=replayed, status_code=200 if replayed else 201)


@router.get("", response_model=list[AllowanceResponse], responses=_errors())
async def list_allowances(user_id: UUID, request: Request, _: ReaderCaller) -> list[AllowanceResponse]:
    """The user's allowances, stopped ones included, oldest first."""
    return [_view(allowance) for allowance in await allowances.user_allowances(_pool(request), user_id=user_id)]


@router.get("/{allowance_id}", response_model=AllowanceResponse, responses=_errors(404))
async def get_allowance(allowance_id: UUID, request: Request, caller: AnyCaller) -> AllowanceResponse:
    """One allowance, with its latest granted period."""
    allowance = await allowances.get_allowance(_pool(request), allowance_id=allowance_id)
    authorize_reader(caller, allowance.user_id)
    return _view(allowance)


@router.delete("/{allowance_id}", response_model=AllowanceResponse, responses=_errors(404))
async def stop_allowance(allowance_id: UUID, request: Request, _: ServiceCaller) -> AllowanceResponse:
    """Stop granting: no period that starts later is granted; the current period's grant stays until it
    expires. Idempotent: stopping a stopped allowance answers the same."""
    return _view(await allowances.stop_allowance(_pool(request), allowance_id=allowance_id))
