"""Service credentials: named, scoped tokens from BILLING_SERVICE_TOKENS or from the database.

Scopes:
- `charge`: charge, and holds (create, capture, release, extend, children);
- `credit`: credit (and, later, grants and refunds);
- `read`: balance, transactions, usage, holds, the events feed;
- `admin`: accounts, webhooks, tokens.

An env entry is `name:scope1+scope2:token`, or a bare token: every scope, named `token-1`, `token-2`, ... by
its position. A database token is `bst_<id>_<secret>`; only its SHA-256 is stored, and the secret is shown
once, by `billing tokens create`. Each worker keeps the active hashes in memory (`DatabaseTokens`), refreshed
every second: checking a token costs a hash and a dict lookup, never a round trip. A revoked token stops
working within that second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from billing_service.callers import sql
from billing_service.errors import BillingError, InvalidRequest, NotFound
from billing_service.logs import get_logger

SCOPES = ("charge", "credit", "read", "admin")
ALL_SCOPES = frozenset(SCOPES)
TOKEN_PREFIX = "bst_"  # noqa: S105 - a prefix, not a secret
_ID_LENGTH = 12
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REFRESH_SECONDS = 1.0

log = get_logger("billing_service.callers")


class TokenConfigError(ValueError):
    """BILLING_SERVICE_TOKENS (or a token command) names a bad scope, a bad name or a name twice."""


class TokenNameTaken(BillingError):
    status_code = 409
    code = "token_name_taken"
    detail = "A token with this name already exists (names are never reused, even after a revoke)."


@dataclass(frozen=True)
class ServiceToken:
    name: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    parts = [part.strip() for part in (text.split("+") if isinstance(text, str) else text)]
    parts = [part for part in parts if part]
    unknown = sorted(set(parts) - ALL_SCOPES)
    if unknown:
        raise TokenConfigError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not parts:
        raise TokenConfigError(f"a token needs at least one scope of {', '.join(SCOPES)}")
    return frozenset(parts)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TokenConfigError(
            f"token name {name[:70]!r} is not valid: 1 to 64 of letters, digits, '.', '_', '-', starting with "
            "a letter or digit"
        )
    return name


def parse_env_tokens(entries: Iterable[str]) -> list[tuple[ServiceToken, bytes]]:
    """BILLING_SERVICE_TOKENS entries as (token, secret). Error messages never quote a secret."""
    parsed: list[tuple[ServiceToken, bytes]] = []
    for position, entry in enumerate(entries, start=1):
        if ":" not in entry:
            parsed.append((ServiceToken(f"token-{position}", ALL_SCOPES), entry.encode()))
            continue
        name, scopes, secret = (entry.split(":", 2) + ["", ""])[:3]
        where = f"BILLING_SERVICE_TOKENS entry {position}"
        if not secret:
            raise TokenConfigError(f"{where}: write it as name:scope1+scope2:token, or a bare token")
        try:
            parsed.append((ServiceToken(check_name(name), parse_scopes(scopes)), secret.encode()))
        except TokenConfigError as exc:
            raise TokenConfigError(f"{where}: {exc}") from None
    names = [token.name for token, _ in parsed]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise TokenConfigError(f"BILLING_SERVICE_TOKENS names {', '.join(twice)} more than once")
    return parsed


def env_secrets(entries: Iterable[str]) -> list[str]:
    """The secret part of every entry, whatever its shape, so the logs can scrub it (never raises)."""
    found = []
    for entry in entries:
        found.append(entry)
        if entry.count(":") >= 2:
            found.append(entry.split(":", 2)[2])
    return [secret for secret in found if secret]


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _new_token() -> tuple[str, str]:
    token_id = secrets.token_hex(_ID_LENGTH // 2)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


async def create_token(
    pool: AsyncConnectionPool, *, name: str, scopes: frozenset[str], reserved: Iterable[str]
) -> tuple[str, TokenInfo]:
    """A new database token: returns its secret (shown once, never stored) and what is stored about it."""
    check_name(name)
    if name in set(reserved):
        raise TokenNameTaken(f"{name!r} is the name of a token in BILLING_SERVICE_TOKENS.")
    token_id, token = _new_token()
    ordered = [scope for scope in SCOPES if scope in scopes]
    params = {"id": token_id, "name": name, "scopes": ordered, "token_hash": hash_token(token)}
    async with pool.connection() as conn:
        try:
            cursor = await conn.execute(sql.TOKEN_CREATE, params)
        except psycopg.errors.UniqueViolation as exc:
            raise TokenNameTaken() from exc
        row = await cursor.fetchone()
    assert row is not None
    return token, TokenInfo(name, ordered, row[0], None, None)


async def list_tokens(pool: AsyncConnectionPool) -> list[TokenInfo]:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.TOKEN_LIST)
        return [TokenInfo(*row) for row in await cursor.fetchall()]


async def revoke_token(pool: AsyncConnectionPool, *, name: str) -> None:
    if not _NAME.fullmatch(name):  # e.g. a NUL, which PostgreSQL text cannot even hold: no such token
        raise NotFound("No active database token has this name.", code="token_not_found")
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.TOKEN_REVOKE, {"name": name})
        if await cursor.fetchone() is None:
            raise NotFound(f"No active database token is named {name[:70]!r}.", code="token_not_found")


def token_names(conn: psycopg.Connection[Any]) -> set[str]:
    return {row[0] for row in conn.execute(sql.TOKEN_NAMES)}


def scopes_from_text(text: str) -> frozenset[str]:
    """For the CLI and the API: scopes as `charge+read` (or comma-separated), as a 422 when wrong."""
    try:
        return parse_scopes(text.replace(",", "+"))
    except TokenConfigError as exc:
        raise InvalidRequest(f"scopes: {exc}", code="invalid_scope") from exc


_NO_MATCH = hashlib.sha256(b"no token has this hash").digest()


class DatabaseTokens:
    """The active database tokens, by id, in this worker's memory; refreshed in the background."""

    def __init__(self, pool: AsyncConnectionPool, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self._pool = pool
        self._refresh_seconds = refresh_seconds
        self._by_id: dict[str, tuple[ServiceToken, bytes]] = {}
        self._used: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def verify(self, token: str) -> ServiceToken | None:
        """The token's identity, or None. The hash is compared in constant time, found id or not."""
        if not token.startswith(TOKEN_PREFIX) or len(token) < 30 or token[4 + _ID_LENGTH] != "_":
            return None
        token_id = token[4 : 4 + _ID_LENGTH]
        found = self._by_id.get(token_id)
        matched = hmac.compare_digest(hash_token(token), found[1] if found else _NO_MATCH)
        if found is None or not matched:
            return None
        self._used.add(token_id)
        return found[0]

    async def refresh(self) -> None:
        used, self._used = self._used, set()
        async with self._pool.connection() as conn:
            if used:
                await conn.execute(sql.TOKENS_USED, {"ids": sorted(used)})
            cursor = await conn.execute(sql.ACTIVE_TOKENS)
            rows = await cursor.fetchall()
        self._by_id = {
            token_id: (ServiceToken(name, frozenset(scopes)), bytes(digest)) for token_id, name, scopes, digest in rows
        }

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the database may be down: keep the last known set
                log.warning("service token refresh failed", error=type(exc).__name__)
            await asyncio.sleep(self._refresh_seconds)
