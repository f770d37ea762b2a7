"""HTTP routes for holds: parse, authorise, call `holds`, shape the response. No rules and no SQL here."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from billing_service import metrics
from billing_service.edge import codec
from billing_service.edge.auth import AnyCaller, Caller, ReaderCaller, ServiceCaller
from billing_service.edge.codec import Answer
from billing_service.edge.fast_lane import FastRoute
from billing_service.errors import HoldNotFound, documented
from billing_service.holds import rules as holds
from billing_service.holds.batcher import CaptureBatcher
from billing_service.holds.schemas import (
    CaptureRequest,
    CaptureResponse,
    ChildHoldRequest,
    ExtendRequest,
    HoldRequest,
    HoldResponse,
    HoldTreeResponse,
)
from billing_service.ledger.routes import IdempotencyKey, _pool

router = APIRouter(prefix="/billing/holds", tags=["holds"])


_errors = documented


_NOT_FOUND = {404: "No such hold"}
_CONFLICTS = {409: "The hold is not active, or the amount exceeds what it has remaining", **_NOT_FOUND}


def _hold_fields(hold: holds.Hold) -> dict[str, Any]:
    """A hold as HoldResponse's fields, for msgspec to encode directly: no model round trip on the hot path."""
    return {
        "hold_id": hold.hold_id,
        "user_id": hold.user_id,
        "parent_id": hold.parent_id,
        "depth": hold.depth,
        "amount": hold.amount,
        "remaining": hold.remaining,
        "captured": hold.captured,
        "status": hold.status,
        "expires_at": hold.expires_at,
        "description": hold.description,
        "metadata": hold.metadata,
        "created_at": hold.created_at,
    }


def _hold_body(hold: holds.Hold) -> dict[str, Any]:
    """The same fields, validated and rendered through HoldResponse, for the FastAPI routes' JSON answers."""
    return HoldResponse(**_hold_fields(hold)).model_dump(mode="json")


def _tree_body(node: holds.HoldNode) -> dict[str, Any]:
    return {
        **_hold_body(node.hold),
        "subtree_captured": node.subtree_captured,
        "subtree_remaining": node.subtree_remaining,
        "children": [_tree_body(child) for child in node.children],
    }


def _answer(hold: holds.Hold, replayed: bool, status_code: int = 200) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(_hold_body(hold), status_code=status_code, headers=headers)


@router.post(
    "",
    response_model=HoldResponse,
    status_code=201,
    responses=_errors({402: "The available balance is too low, or unknown account", 413: "Body too large"}),
)
async def create_hold(
    body: HoldRequest, request: Request, caller: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Reserve tokens from the available balance for an agent run, for `ttl_seconds` unless extended."""
    request.app.state.limiter.check_user(body.user_id)
    hold, replayed = await holds.create_hold(
        _pool(request),
        user_id=body.user_id,
        amount=body.amount,
        description=body.description,
        ttl_seconds=body.ttl_seconds,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
        posted_by=caller.name,
        request_id=caller.request_id,
    )
    return _answer(hold, replayed, status_code=201)


@router.get("", response_model=list[HoldResponse], responses=_errors({}))
async def list_holds(
    user_id: UUID,
    request: Request,
    _: ReaderCaller,
    status: Annotated[Literal["any", "active", "expired", "captured", "released"], Query()] = "any",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[UUID | None, Query(description="A hold id: list holds older than it.")] = None,
) -> JSONResponse:
    """A user's holds, newest first."""
    found = await holds.list_holds(_pool(request), user_id=user_id, status=status, limit=limit, before=before)
    return JSONResponse([_hold_body(hold) for hold in found])


@router.get("/{hold_id}", response_model=HoldTreeResponse, responses=_errors(_NOT_FOUND))
async def get_hold(hold_id: UUID, request: Request, caller: AnyCaller) -> JSONResponse:
    """The hold and the tree of child budgets below it, with what each node and subtree captured."""
    tree = await holds.hold_tree(_pool(request), hold_id=hold_id)
    if not caller.service and caller.user_id != tree.hold.user_id:
        raise HoldNotFound()  # a user learns nothing about other users' holds, not even that they exist
    return JSONResponse(_tree_body(tree))


async def capture(
    state: Any, hold_id: UUID, body: CaptureRequest, idempotency_key: str | None, caller: Caller
) -> Answer:
    batcher: CaptureBatcher | None = state.capture_batcher
    post = batcher.capture if batcher is not None else partial(holds.capture, state.pool)
    captured = await post(
        hold_id=hold_id,
        amount=body.amount,
        description=body.description,
        metadata=body.metadata,
        final=body.final,
        allow_overrun=body.allow_overrun,
        idempotency_key=idempotency_key,
        posted_by=caller.name,
        request_id=caller.request_id,
    )
    metrics.record_capture(body.amount, replayed=captured.replayed)
    answer = {
        "status": "success",
        "transaction_id": captured.transaction_id,
        "balance": captured.balance,
        "hold": _hold_fields(captured.hold),
    }
    return codec.answer(answer, replayed=captured.replayed)


# A streaming agent run captures many times: capture is hot, served by the edge's fast lane.
fast_routes = [FastRoute("POST", "/billing/holds/{hold_id}/capture", "service", capture, CaptureRequest)]


@router.post(
    "/{hold_id}/capture",
    response_model=CaptureResponse,
    responses=_errors({**_CONFLICTS, 402: "allow_overrun, and the available balance does not cover the excess"}),
)
async def capture_hold(
    hold_id: UUID, body: CaptureRequest, request: Request, caller: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> Response:
    """Post a debit of `amount` from the hold. Repeatable while tokens stream; `final` releases the rest."""
    return (await capture(request.app.state, hold_id, body, idempotency_key, caller)).response()


@router.post("/{hold_id}/release", response_model=HoldResponse, responses=_errors(_CONFLICTS))
async def release_hold(
    hold_id: UUID, request: Request, _: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Void what the hold (and every child budget below it) still reserves."""
    hold, replayed = await holds.release(_pool(request), hold_id=hold_id, idempotency_key=idempotency_key)
    return _answer(hold, replayed)


@router.post("/{hold_id}/extend", response_model=HoldResponse, responses=_errors(_CONFLICTS))
async def extend_hold(
    hold_id: UUID, body: ExtendRequest, request: Request, _: ServiceCaller, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Renew the lease: expire no sooner than `ttl_seconds` from now, and never after the parent hold."""
    hold, replayed = await holds.extend(
        _pool(request), hold_id=hold_id, ttl_seconds=body.ttl_seconds, idempotency_key=idempotency_key
    )
    return _answer(hold, replayed)


@router.post(
    "/{hold_id}/children",
    response_model=HoldResponse,
    status_code=201,
    responses=_errors({**_CONFLICTS, 413: "Body too large"}),
)
async def carve_child(
    hold_id: UUID,
    body: ChildHoldRequest,
    request: Request,
    caller: ServiceCaller,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Carve a sub-agent's budget out of this hold's remaining, without touching the available balance."""
    child, replayed = await holds.carve_child(
        _pool(request),
        parent_id=hold_id,
        amount=body.amount,
        description=body.description,
        ttl_seconds=body.ttl_seconds,
        metadata=body.metadata,
        idempotency_key=idempotency_key,
        posted_by=caller.name,
        request_id=caller.request_id,
    )
    return _answer(child, replayed, status_code=201)
