"""HTTP routes of events: the feed and webhooks. Parse, authorise, call `events.rules`; no SQL here."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from billing_service.edge.auth import AnyCaller, ReaderCaller, ServiceCaller
from billing_service.errors import ErrorBody, Forbidden
from billing_service.events import rules as events
from billing_service.events.schemas import (
    DeliveryResponse,
    EventResponse,
    EventType,
    ReplayRequest,
    ReplayResponse,
    WebhookRequest,
    WebhookResponse,
)
from billing_service.ledger.routes import _pool
from billing_service.settings import Settings

router = APIRouter(prefix="/billing", tags=["events"])


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    common = {
        401: "Missing or invalid token",
        403: "Token may not do this",
        413: "Body too large",
        422: "Invalid request",
    }
    return {
        status: {"model": ErrorBody, "description": text}
        for status, text in {**common, 503: "Database unavailable; retry after Retry-After", **described}.items()
    }


_NOT_FOUND = {404: "No such webhook"}


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _link(request: Request, **params: Any) -> str:
    url = request.url.include_query_params(**params)
    return f'<{url.path}?{url.query}>; rel="next"'


@router.get(
    "/events",
    response_model=list[EventResponse],
    responses={
        **_errors({}),
        200: {
            "description": 'Oldest first, in commit-safe order. `Link: <...>; rel="next"` continues after the '
            "last event, also on a short page: poll it to tail the feed.",
            "headers": {"Link": {"schema": {"type": "string"}, "description": "RFC 8288 link to the next page"}},
        },
    },
)
async def list_events(
    request: Request,
    caller: AnyCaller,
    after: Annotated[str | None, Query(max_length=200, description="Opaque cursor; from a Link header.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    type: Annotated[EventType | None, Query(description="Only events of this type.")] = None,
    user_id: Annotated[UUID | None, Query(description="Only this account's events (a user JWT: its own).")] = None,
) -> Response:
    """The events feed. Services see every account; a user JWT sees only its own account's events."""
    if not caller.service:
        if user_id is not None and user_id != caller.user_id:
            raise Forbidden("A user may read only their own account's events.")
        user_id = caller.user_id
    rows, next_cursor = await events.feed(_pool(request), after=after, limit=limit, user_id=user_id, type=type)
    return Response(
        "[" + ",".join(rows) + "]", media_type="application/json", headers={"Link": _link(request, after=next_cursor)}
    )


@router.get("/events/recent/{user_id}", response_model=list[EventResponse], responses=_errors({}))
async def recent_events(
    user_id: UUID, request: Request, _: ReaderCaller, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> Response:
    """The account's newest events, newest first: a view for people. To follow events, tail /billing/events."""
    rows = await events.recent(_pool(request), user_id=user_id, limit=limit)
    return Response("[" + ",".join(rows) + "]", media_type="application/json")


def _webhook_body(webhook: events.Webhook) -> dict[str, Any]:
    body = WebhookResponse(**dataclasses.asdict(webhook)).model_dump(mode="json")
    if webhook.secret is None:
        del body["secret"]
    return body


@router.post("/webhooks", response_model=WebhookResponse, status_code=201, responses=_errors({}))
async def create_webhook(body: WebhookRequest, request: Request, _: ServiceCaller) -> JSONResponse:
    """Register a receiver. The answer carries its signing secret, which is never shown again."""
    webhook = await events.create_webhook(
        _pool(request),
        url=body.url,
        events=body.events,
        description=body.description,
        allow_insecure=_settings(request).webhooks_allow_insecure,
    )
    return JSONResponse(_webhook_body(webhook), status_code=201)


@router.get("/webhooks", response_model=list[WebhookResponse], responses=_errors({}))
async def list_webhooks(request: Request, _: ServiceCaller) -> JSONResponse:
    """Every registered webhook (without secrets)."""
    return JSONResponse([_webhook_body(webhook) for webhook in await events.list_webhooks(_pool(request))])


@router.get("/webhooks/{webhook_id}", response_model=WebhookResponse, responses=_errors(_NOT_FOUND))
async def get_webhook(webhook_id: UUID, request: Request, _: ServiceCaller) -> JSONResponse:
    return JSONResponse(_webhook_body(await events.get_webhook(_pool(request), webhook_id=webhook_id)))


@router.delete("/webhooks/{webhook_id}", status_code=204, responses=_errors(_NOT_FOUND))
async def delete_webhook(webhook_id: UUID, request: Request, _: ServiceCaller) -> Response:
    """Remove the webhook, its pending deliveries and its delivery log."""
    await events.delete_webhook(_pool(request), webhook_id=webhook_id)
    return Response(status_code=204)


@router.post("/webhooks/{webhook_id}/rotate-secret", response_model=WebhookResponse, responses=_errors(_NOT_FOUND))
async def rotate_secret(webhook_id: UUID, request: Request, _: ServiceCaller) -> JSONResponse:
    """A new secret, shown once. The old one keeps signing next to it for BILLING_WEBHOOK_SECRET_GRACE_HOURS."""
    webhook = await events.rotate_secret(
        _pool(request), webhook_id=webhook_id, grace_hours=_settings(request).webhook_secret_grace_hours
    )
    return JSONResponse(_webhook_body(webhook))


@router.post("/webhooks/{webhook_id}/replay", response_model=ReplayResponse, responses=_errors(_NOT_FOUND))
async def replay(webhook_id: UUID, body: ReplayRequest, request: Request, _: ServiceCaller) -> JSONResponse:
    """Send events again: those created in [since, until), or the given event_ids, that the webhook subscribes to."""
    count = await events.replay(
        _pool(request), webhook_id=webhook_id, since=body.since, until=body.until, event_ids=body.event_ids
    )
    return JSONResponse({"replayed": count}, status_code=202)


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    response_model=list[DeliveryResponse],
    responses={
        **_errors(_NOT_FOUND),
        200: {
            "description": 'Newest first; `Link: <...>; rel="next"` when there is more.',
            "headers": {"Link": {"schema": {"type": "string"}, "description": "RFC 8288 link to the next page"}},
        },
    },
)
async def list_deliveries(
    webhook_id: UUID,
    request: Request,
    _: ServiceCaller,
    status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The delivery log: each delivery's status and every attempt with its status code, error and latency."""
    rows, next_cursor = await events.deliveries(
        _pool(request), webhook_id=webhook_id, status=status, limit=limit, cursor=cursor
    )
    headers = {"Link": _link(request, limit=limit, cursor=next_cursor)} if next_cursor else {}
    return Response("[" + ",".join(rows) + "]", media_type="application/json", headers=headers)
