"""Console sessions: a signed cookie that names a server-side session. No HTTP here and no ledger reads.

- The cookie is `<id>.<expires>.<mac>`: a random 256-bit session id, its expiry (unix seconds) and an
  HMAC-SHA256 over both. It holds no token and no claims beyond the expiry.
- The HMAC key is derived from configuration, not generated per process, so every worker (and every replica)
  accepts every other's cookies: HMAC(BILLING_JWT_SECRET and BILLING_SERVICE_TOKENS, fixed label). Rotating
  any of those secrets signs every console user out, which is the safe direction.
- The session itself lives in `console_sessions` (migration 0005), keyed by the SHA-256 of the id: who it is
  for (a service, by its token's fingerprint; or a user id) and when it ends. Sign-out revokes the row, so a
  replayed cookie is refused afterwards even before it expires. The MAC lets a forged or tampered cookie be
  refused without a database round trip.
- The CSRF token of a session is HMAC(key, "csrf" + id): nothing to store, checked in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.console import sql
from billing_service.settings import Settings

_LABEL = b"billing_service console session v1"


@dataclass(frozen=True)
class Session:
    id: str
    service: bool
    user_id: UUID | None
    subject: str
    expires_at: datetime


def signing_key(settings: Settings) -> bytes:
    """The same key in every worker: derived from the configured secrets with a fixed label."""
    material = [settings.jwt_secret.get_secret_value() if settings.jwt_secret else ""]
    material += sorted(token.get_secret_value() for token in settings.service_tokens)
    return hmac.new("\x00".join(material).encode(), _LABEL, hashlib.sha256).digest()


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a service token, to show who signed in."""
    return hashlib.sha256(token.encode()).hexdigest()[:10]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _mac(key: bytes, message: str) -> str:
    return _b64(hmac.new(key, message.encode(), hashlib.sha256).digest())


def _id_hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def cookie_value(key: bytes, session_id: str, expires: int) -> str:
    message = f"{session_id}.{expires}"
    return f"{message}.{_mac(key, message)}"


def parse_cookie(key: bytes, value: str | None) -> str | None:
    """The session id of a well-signed, unexpired cookie; None for anything else."""
    if not value or len(value) > 200:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    session_id, expires, mac = parts
    if not hmac.compare_digest(_mac(key, f"{session_id}.{expires}"), mac):
        return None
    if int(expires) <= time.time():
        return None
    return session_id


def csrf_token(key: bytes, session_id: str) -> str:
    return _mac(key, f"csrf.{session_id}")


def csrf_ok(key: bytes, session_id: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(csrf_token(key, session_id).encode(), presented.encode())


async def create(
    pool: AsyncConnectionPool, *, service: bool, user_id: UUID | None, subject: str, seconds: int
) -> tuple[Session, int]:
    """A new session; returns it and its expiry in unix seconds (for the cookie)."""
    session_id = _b64(secrets.token_bytes(32))
    async with pool.connection() as conn:
        await conn.execute(sql.SESSIONS_PRUNE)
        cursor = await conn.execute(
            sql.SESSION_CREATE,
            {
                "id_hash": _id_hash(session_id),
                "service": service,
                "user_id": user_id,
                "subject": subject,
                "seconds": seconds,
            },
        )
        row = await cursor.fetchone()
    assert row is not None
    expires_at: datetime = row[0]
    return Session(session_id, service, user_id, subject, expires_at), int(expires_at.timestamp())


async def lookup(pool: AsyncConnectionPool, session_id: str) -> Session | None:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.SESSION, {"id_hash": _id_hash(session_id)})
        row = await cursor.fetchone()
    return Session(session_id, *row) if row is not None else None


async def revoke(pool: AsyncConnectionPool, session_id: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(sql.SESSION_REVOKE, {"id_hash": _id_hash(session_id)})


def new_nonce() -> str:
    """A random value for the sign-in form's cookie (double-submit CSRF before there is a session)."""
    return _b64(secrets.token_bytes(18))
