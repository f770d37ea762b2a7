"""Who is calling: a service (bearer token from BILLING_SERVICE_TOKENS) or a user (HS256 JWT).

Authentication runs in the edge (`edge.layer`), before the body is read, so a request without valid
credentials gets 401 whatever else is wrong with it. Authorisation (403): writes take services only; reads
take a service or the user whose id is in the path. The fast lane calls `authorize_*` directly; FastAPI
routes get the same checks as dependencies.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from billing_service.errors import Forbidden, Unauthorized
from billing_service.settings import Settings


@dataclass(frozen=True)
class Caller:
    service: bool
    user_id: UUID | None = None


def authenticate(authorization: str | None, settings: Settings) -> Caller:
    if not authorization:
        raise Unauthorized()
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Use 'Authorization: Bearer <token>'.")

    # Compare against every configured token, always, so timing reveals neither a match nor which one.
    presented = token.encode()
    matched = False
    for secret in settings.service_tokens:
        matched |= hmac.compare_digest(secret.get_secret_value().encode(), presented)
    if matched:
        return Caller(service=True)

    if settings.jwt_secret is None or token.count(".") != 2:
        raise Unauthorized("The token is not valid.", code="invalid_token")
    try:
        # algorithms is pinned: a token saying alg "none" or RS256 is refused, never trusted.
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=["HS256"],
            options={"require": ["sub", "exp"]},
        )
        return Caller(service=False, user_id=UUID(str(claims["sub"])))
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("The token has expired.", code="invalid_token") from exc
    except (jwt.InvalidTokenError, ValueError) as exc:
        raise Unauthorized("The token is not valid.", code="invalid_token") from exc


# Documents the scheme in OpenAPI; the edge has already done the checking.
_bearer = HTTPBearer(auto_error=False, description="A service token, or a user JWT (HS256) for reads.")


# The dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in a thread pool, and that
# hand-off cost more than the whole database round trip of a balance read (py-spy, docs/performance.md).
async def _caller(request: Request, _: Annotated[object, Depends(_bearer)]) -> Caller:
    caller = getattr(request.state, "caller", None)
    if caller is None:  # the edge did not authenticate this request: fail closed
        raise Unauthorized()
    assert isinstance(caller, Caller)
    return caller


def authorize_service(caller: Caller) -> None:
    if not caller.service:
        raise Forbidden("Only services may write to the ledger.")


def authorize_reader(caller: Caller, user_id: UUID) -> None:
    if not caller.service and caller.user_id != user_id:
        raise Forbidden("A user may read only their own account.")


async def require_service(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    authorize_service(caller)
    return caller


async def require_reader(user_id: UUID, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    authorize_reader(caller, user_id)
    return caller


AnyCaller = Annotated[Caller, Depends(_caller)]
ServiceCaller = Annotated[Caller, Depends(require_service)]
ReaderCaller = Annotated[Caller, Depends(require_reader)]
