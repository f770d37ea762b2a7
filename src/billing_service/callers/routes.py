"""HTTP routes for service tokens (scope `admin`): create, list, revoke. The CLI does the same (`billing tokens`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from billing_service.callers import rules as callers
from billing_service.callers.schemas import CreatedTokenResponse, CreateTokenRequest, TokenResponse
from billing_service.edge.auth import ServiceCaller
from billing_service.errors import ErrorBody, InvalidRequest
from billing_service.ledger.routes import _pool

router = APIRouter(prefix="/billing/tokens", tags=["tokens"])


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    common = {401: "Missing or invalid token", 403: "The token lacks the admin scope", 422: "Invalid request"}
    return {status: {"model": ErrorBody, "description": text} for status, text in {**common, **described}.items()}


def _info(info: callers.TokenInfo) -> dict[str, Any]:
    return TokenResponse(**info.__dict__).model_dump(mode="json")


@router.post(
    "", response_model=CreatedTokenResponse, status_code=201, responses=_errors({409: "The name is already taken"})
)
async def create_token(body: CreateTokenRequest, request: Request, _: ServiceCaller) -> JSONResponse:
    """Make a named, scoped service token. The secret is in this answer only; the database keeps its hash."""
    scopes = callers.scopes_from_text("+".join(body.scopes))
    try:
        callers.check_name(body.name)
    except callers.TokenConfigError as exc:
        raise InvalidRequest(f"name: {exc}", code="invalid_token_name") from exc
    token, info = await callers.create_token(
        _pool(request), name=body.name, scopes=scopes, reserved=request.app.state.authenticator.env_names
    )
    return JSONResponse({**_info(info), "token": token}, status_code=201)


@router.get("", response_model=list[TokenResponse], responses=_errors({}))
async def list_tokens(request: Request, _: ServiceCaller) -> JSONResponse:
    """Every database token (revoked ones too), without secrets; env tokens are not listed."""
    return JSONResponse([_info(info) for info in await callers.list_tokens(_pool(request))])


@router.delete("/{name}", status_code=204, responses=_errors({404: "No active token of that name"}))
async def revoke_token(name: str, request: Request, _: ServiceCaller) -> Response:
    """Revoke a database token; every worker refuses it within a second."""
    await callers.revoke_token(_pool(request), name=name)
    return Response(status_code=204)
