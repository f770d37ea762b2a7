"""HTTP routes for refunds: parse, authorise, call `refunds`, shape the response. No rules and no SQL here."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from billing_service.edge.auth import ServiceCaller
from billing_service.errors import documented
from billing_service.ledger.routes import IdempotencyKey, _pool
from billing_service.refunds import rules as refunds
from billing_service.refunds.schemas import RefundRequest, RefundResponse

router = APIRouter(prefix="/billing/transactions", tags=["refunds"])

_ERRORS = documented(
    {
        404: "No such transaction on this account",
        409: "More than is left to refund, or a concurrent request with the same Idempotency-Key",
        413: "Body too large",
        415: "Body not declared as JSON",
        422: "Invalid request, or not a debit or capture",
    }
)


@router.post("/{transaction_id}/refund", response_model=RefundResponse, responses=_ERRORS)
async def refund_transaction(
    transaction_id: UUID,
    body: RefundRequest,
    request: Request,
    caller: ServiceCaller,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Give back all or part of a debit or a capture (a failed model call). The tokens return to the grants
    that paid for it, the last drawn first; a grant that has expired since gets them as a new grant with no
    expiry. Refunds of one charge never add up to more than it."""
    refund = await refunds.refund(
        _pool(request),
        user_id=body.user_id,
        transaction_id=transaction_id,
        amount=body.amount,
        description=body.description,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
        posted_by=caller.name,
        request_id=caller.request_id,
    )
    answer = RefundResponse(
        transaction_id=refund.transaction_id,
        refund_of=refund.refund_of,
        amount=refund.amount,
        balance=refund.balance,
        refunded_total=refund.refunded_total,
    )
    headers = {"Idempotent-Replayed": "true"} if refund.replayed else None
    return JSONResponse(answer.model_dump(mode="json"), headers=headers)
