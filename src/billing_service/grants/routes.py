"""HTTP routes for grants: parse, authorise, call `grants`, shape the response. No rules and no SQL here."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from billing_service.edge.auth import ReaderCaller, ServiceCaller
from billing_service.errors import documented
from billing_service.grants import rules as grants
from billing_service.grants.schemas import GrantResponse, VoidRequest, VoidResponse
from billing_service.ledger.routes import _pool

router = APIRouter(prefix="/billing/grants", tags=["grants"])

_ERRORS = documented({404: "No such account or grant"})


def _view(grant: grants.Grant) -> GrantResponse:
    return GrantResponse(**grant.__dict__)


@router.get("/{user_id}", response_model=list[GrantResponse], responses=_ERRORS)
async def list_grants(user_id: UUID, request: Request, _: ReaderCaller) -> list[GrantResponse]:
    """The live grants (tokens left to draw, or reserved by holds), in the order debits draw them: lowest
    priority first, then the earliest expiry (no expiry last), then the oldest."""
    return [_view(grant) for grant in await grants.live_grants(_pool(request), user_id=user_id)]


@router.post("/{grant_id}/void", response_model=VoidResponse, responses=_ERRORS)
async def void_grant(
    grant_id: UUID, request: Request, caller: ServiceCaller, body: VoidRequest | None = None
) -> JSONResponse:
    """Remove what is left of a grant (a revoked trial): a `void` ledger row now, and tokens that holds reserved
    of it are written off when they come back. Idempotent: voiding again removes nothing and answers the same."""
    voided = await grants.void_grant(
        _pool(request),
        grant_id=grant_id,
        description=(body or VoidRequest()).description,
        posted_by=caller.name,
        request_id=caller.request_id,
    )
    answer = VoidResponse(grant=_view(voided.grant), voided=voided.voided, transaction_id=voided.transaction_id)
    headers = {"Idempotent-Replayed": "true"} if voided.replayed else None
    return JSONResponse(answer.model_dump(mode="json"), headers=headers)
