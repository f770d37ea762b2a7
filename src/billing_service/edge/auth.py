"""Who is calling, and may they: service tokens with names and scopes, and user JWTs.

Authentication runs in the edge (`edge.layer`), before the body is read, so a request without valid
credentials gets 401 whatever else is wrong with it. Credentials, cheapest first:
1. a token from BILLING_SERVICE_TOKENS (`name:scope1+scope2:token`, or bare: every scope), compared in constant
   time against every configured one;
2. a database token (`bst_<id>_<secret>`, `billing tokens create`): its SHA-256 against the worker's
   in-memory copy of the active hashes (callers/rules.py), never a round trip;
3. a user JWT: HS256 with BILLING_JWT_SECRET, or RS256/EdDSA/ES256 with a key from BILLING_JWKS_URL by `kid`
   (each key's algorithm pinned by its type; `iss`/`aud` checked when configured). Keys are cached; an
   unknown `kid` refetches the set at most once a second, off the event loop, with a 2 s timeout. A JWKS
   that cannot be fetched answers 503 auth_unavailable: never a hang, never an unverified token.

Authorisation, also in the edge, once per request: every /billing route needs one scope (`ROUTE_SCOPES`;
a route missing from the table needs `read` for GET and `admin` for anything else, so a new route is never
open). A service token without it gets 403 insufficient_scope; a user has only `read`, and only of their own
account (`authorize_reader`, in the routes and the fast lane).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import jwt
from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.routing import compile_path

from billing_service.callers.rules import ALL_SCOPES, DatabaseTokens, ServiceToken, parse_env_tokens
from billing_service.errors import AuthUnavailable, Forbidden, InsufficientScope, Unauthorized
from billing_service.logs import get_logger
from billing_service.settings import Settings

log = get_logger("billing_service.auth")

_READ_ONLY = frozenset({"read"})
_READS = frozenset({"GET", "HEAD"})

# Which scope each route needs. Holds are the two-phase form of a charge, so they take `charge`.
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("POST", "/billing/charge-tokens"): "charge",
    ("POST", "/billing/credit-tokens"): "credit",
    ("POST", "/billing/accounts"): "admin",
    ("PATCH", "/billing/accounts/{user_id}"): "admin",
    ("GET", "/billing/balance/{user_id}"): "read",
    ("GET", "/billing/transactions/{user_id}"): "read",
    ("GET", "/billing/usage/{user_id}"): "read",
    ("POST", "/billing/holds"): "charge",
    ("GET", "/billing/holds"): "read",
    ("GET", "/billing/holds/{hold_id}"): "read",
    ("POST", "/billing/holds/{hold_id}/capture"): "charge",
    ("POST", "/billing/holds/{hold_id}/release"): "charge",
    ("POST", "/billing/holds/{hold_id}/extend"): "charge",
    ("POST", "/billing/holds/{hold_id}/children"): "charge",
    # A refund gives tokens back, like a credit.
    ("POST", "/billing/transactions/{transaction_id}/refund"): "credit",
}
# Whole families, whatever routes they grow: (path prefix, method or None for any, scope).
PREFIX_SCOPES: tuple[tuple[str, str | None, str], ...] = (
    ("/billing/webhooks", None, "admin"),
    ("/billing/tokens", None, "admin"),
    ("/billing/events", "GET", "read"),
    ("/billing/grants", "POST", "credit"),
    ("/billing/allowances", "GET", "read"),
    ("/billing/allowances", None, "credit"),
)


def required_scope(method: str, template: str) -> str:
    scope = ROUTE_SCOPES.get((method, template))
    if scope is not None:
        return scope
    for prefix, prefix_method, prefix_scope in PREFIX_SCOPES:
        if template.startswith(prefix) and prefix_method in (None, method):
            return prefix_scope
    return "read" if method in _READS else "admin"


class ScopeTable:
    """The scope a request needs, from the route template its path matches (the app's own routes)."""

    def __init__(self, app: FastAPI) -> None:
        self._routes: list[tuple[re.Pattern[str], str]] = [
            (compile_path(route.path)[0], route.path)
            for route in app.routes
            if isinstance(route, APIRoute) and route.path.startswith("/billing")
        ]

    def template(self, path: str) -> str:
        for pattern, template in self._routes:
            if pattern.match(path):
                return template
        return path  # no such route: the prefix rules and the method decide, and the route answers 404

    def scope(self, method: str, path: str) -> str:
        return required_scope(method, self.template(path))


@dataclass(frozen=True, slots=True)
class Caller:
    service: bool
    user_id: UUID | None = None
    # The token's name (never its secret), or `user:<id>`: what the ledger records as `posted_by`.
    name: str = ""
    scopes: frozenset[str] = ALL_SCOPES
    request_id: str | None = None


def authorize_scope(caller: Caller, scope: str) -> None:
    if scope in caller.scopes:
        return
    if not caller.service:
        raise Forbidden("Only services may write to the ledger." if scope != "read" else "Users may not read this.")
    raise InsufficientScope(
        f"This route needs the '{scope}' scope; token '{caller.name}' has {'+'.join(sorted(caller.scopes))}."
    )


_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})


class JwksKeys:
    """The identity provider's public keys by `kid`, fetched with PyJWKClient in a thread, cached."""

    TIMEOUT = 2.0
    REFETCH_AFTER_MISS = 1.0  # an unknown kid refetches at most this often: a flood of bogus kids is cheap
    STALE_AFTER = 300.0  # then refreshed in the background, so keys the IdP removed stop working

    def __init__(self, url: str) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=self.TIMEOUT)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = 0.0
        self._attempted = -1e9
        self._down = False
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK:
        key = self._keys.get(kid)
        if key is not None:
            if time.monotonic() - self._fetched > self.STALE_AFTER and self._background is None:
                self._background = asyncio.create_task(self._refresh_in_background())
            return key
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._attempted >= self.REFETCH_AFTER_MISS:
                await self._fetch()
            key = self._keys.get(kid)
        if key is not None:
            return key
        if self._down:
            raise AuthUnavailable()
        raise Unauthorized("The token's signing key is not one the identity provider publishes.", code="invalid_token")

    async def _refresh_in_background(self) -> None:
        try:
            async with self._lock:
                await self._fetch()
        finally:
            self._background = None

    async def _fetch(self) -> None:
        self._attempted = time.monotonic()
        try:
            jwk_set = await asyncio.to_thread(self._client.get_jwk_set, True)
        except Exception as exc:  # noqa: BLE001 - down, slow, or garbage: every one of them fails closed
            self._down = True
            log.warning("JWKS fetch failed", error=type(exc).__name__)
            return
        # Only asymmetric keys: an `oct` key in a JWKS would be a shared secret published to the world.
        self._keys = {key.key_id: key for key in jwk_set.keys if key.key_id and key.algorithm_name in _ASYMMETRIC}
        self._fetched, self._down = time.monotonic(), False


class Authenticator:
    """Built once per worker from the settings; `db_tokens` is attached when the pool exists."""

    def __init__(self, settings: Settings) -> None:
        self._env_tokens: list[tuple[ServiceToken, bytes]] = parse_env_tokens(
            token.get_secret_value() for token in settings.service_tokens
        )
        self.db_tokens: DatabaseTokens | None = None
        self._jwt_secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._jwks = JwksKeys(settings.jwks_url) if settings.jwks_url else None
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience

    @property
    def env_names(self) -> list[str]:
        return [token.name for token, _ in self._env_tokens]

    async def authenticate(self, authorization: str | None, request_id: str | None = None) -> Caller:
        if not authorization:
            raise Unauthorized()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Use 'Authorization: Bearer <token>'.")

        # Compare against every configured token, always, so timing reveals neither a match nor which one.
        presented = token.encode()
        found = None
        for service_token, secret in self._env_tokens:
            if hmac.compare_digest(secret, presented):
                found = service_token
        if found is None and self.db_tokens is not None:
            found = self.db_tokens.verify(token)
        if found is not None:
            return Caller(service=True, name=found.name, scopes=found.scopes, request_id=request_id)

        if token.count(".") != 2 or (self._jwt_secret is None and self._jwks is None):
            raise Unauthorized("The token is not valid.", code="invalid_token")
        try:
            claims = await self._verify_jwt(token)
            user_id = UUID(str(claims["sub"]))
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("The token has expired.", code="invalid_token") from exc
        except (jwt.InvalidTokenError, ValueError) as exc:
            raise Unauthorized("The token is not valid.", code="invalid_token") from exc
        return Caller(service=False, user_id=user_id, name=f"user:{user_id}", scopes=_READ_ONLY, request_id=request_id)

    async def _verify_jwt(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        if self._jwt_secret is not None and header.get("alg") == "HS256":
            # algorithms is pinned: a token saying alg "none" or RS256 is refused, never trusted.
            claims: dict[str, Any] = jwt.decode(
                token, self._jwt_secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}
            )
            return claims
        if self._jwks is None or not isinstance(kid, str):
            raise jwt.InvalidTokenError("no key for this token")
        key = await self._jwks.key(kid)
        required = ["sub", "exp", *(["iss"] if self._issuer else []), *(["aud"] if self._audience else [])]
        # The key's own algorithm, never the header's: an HS256 token "signed" with the public key fails here.
        claims = jwt.decode(
            token,
            key,
            algorithms=[key.algorithm_name],
            issuer=self._issuer,
            audience=self._audience,
            options={"require": required, "verify_aud": self._audience is not None},
        )
        return claims


# Documents the scheme in OpenAPI; the edge has already done the checking.
_bearer = HTTPBearer(auto_error=False, description="A service token, or a user JWT for reads.")


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
