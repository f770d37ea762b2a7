"""Events: the outbox's readers (the feed), webhooks and their deliveries. No HTTP here.

The outbox itself is written by the ledger's and holds' statements (events/sql.py fragments); this module
reads it, manages webhooks, and writes the one event that is not part of those statements: balance.depleted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_args
from urllib.parse import urlsplit
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.errors import InvalidRequest, NotFound
from billing_service.events import config, sql
from billing_service.events.schemas import EventType

EVENT_TYPES: tuple[str, ...] = get_args(EventType)  # the catalogue, written once in schemas.py
_ZERO_UUID = UUID(int=0)
_MAX_UUID = UUID(int=2**128 - 1)


async def notify_depleted(pool: AsyncConnectionPool, *, user_id: UUID, amount: int, operation: str) -> None:
    """Write balance.depleted for a refusal, unless one was written since the account's last credit."""
    if not config.enabled:
        return
    async with pool.connection() as conn:
        await conn.execute(
            sql.DEPLETED, {"user_id": user_id, "amount": amount, "operation": operation, "events": config.enabled}
        )


# ---------------------------------------------------------------------------------------------------------
# The feed


def encode_cursor(txid: str, user_id: UUID, seq: int) -> str:
    return base64.urlsafe_b64encode(f"e1:{txid}:{user_id}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, UUID, int]:
    try:
        version, txid, user_id, seq = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(":")
        parsed = (str(int(txid)), UUID(user_id), int(seq))
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidRequest("The cursor is not one this service issued.", code="invalid_cursor") from exc
    if version != "e1" or not 0 <= int(parsed[0]) < 2**63 or not 0 <= parsed[2] < 2**63:
        raise InvalidRequest("The cursor is not one this service issued.", code="invalid_cursor")
    return parsed


async def feed(
    pool: AsyncConnectionPool, *, after: str | None, limit: int, user_id: UUID | None, type: str | None
) -> tuple[list[str], str]:
    """Events in commit-safe order after the cursor, as JSON texts, and the cursor to continue from.

    The next cursor is returned even for a short or empty page: a consumer tails the feed by polling it."""
    txid, after_user, after_seq = decode_cursor(after) if after else ("0", _ZERO_UUID, 0)
    filters = {name: value for name, value in {"user_id": user_id, "type": type}.items() if value is not None}
    params = {**filters, "after_txid": txid, "after_user_id": after_user, "after_seq": after_seq, "limit": limit}
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.feed(list(filters)), params)
        rows = await cursor.fetchall()
    next_cursor = encode_cursor(*rows[-1][:3]) if rows else (after or encode_cursor("0", _ZERO_UUID, 0))
    return [row[3] for row in rows], next_cursor


# ---------------------------------------------------------------------------------------------------------
# Webhooks


@dataclass(frozen=True)
class Webhook:
    id: UUID
    url: str
    events: list[str]
    description: str | None
    created_at: datetime
    updated_at: datetime
    previous_secret_expires_at: datetime | None
    secret: str | None = None  # only right after create and rotate


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _forbidden_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


async def check_destination(url: str, *, allow_insecure: bool) -> None:
    """SSRF guard, run at registration and again before every delivery (DNS may have changed since).

    https only, and every address the host resolves to must be public, unless BILLING_WEBHOOKS_ALLOW_INSECURE.
    Raises InvalidRequest (code webhook_url_not_allowed or webhook_url_invalid)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidRequest("url: must be an absolute https:// URL.", code="webhook_url_invalid")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("url: must not carry credentials.", code="webhook_url_invalid")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest("url: the port is not valid.", code="webhook_url_invalid") from exc
    if allow_insecure:
        return
    if parts.scheme != "https":
        raise InvalidRequest("url: only https:// URLs are allowed.", code="webhook_url_not_allowed")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest("url: the host does not resolve.", code="webhook_url_invalid") from exc
    addresses = {str(info[4][0]) for info in infos}
    if not addresses or any(_forbidden_address(address) for address in addresses):
        raise InvalidRequest(
            "url: the host resolves to a private, loopback, link-local, multicast or reserved address.",
            code="webhook_url_not_allowed",
        )


def _webhook(row: Any) -> Webhook:
    return Webhook(*row)


async def create_webhook(
    pool: AsyncConnectionPool, *, url: str, events: list[str], description: str | None, allow_insecure: bool
) -> Webhook:
    unknown = sorted(set(events) - {*EVENT_TYPES, "*"})
    if unknown:
        raise InvalidRequest(
            f"events: unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)} or *.",
            code="unknown_event_type",
        )
    await check_destination(url, allow_insecure=allow_insecure)
    async with pool.connection() as conn:
        cursor = await conn.execute(
            sql.WEBHOOK_CREATE,
            {"url": url, "events": sorted(set(events)), "description": description, "secret": new_secret()},
        )
        row = await cursor.fetchone()
        await conn.execute(sql.WAKE_DISPATCHER)
    return _webhook(row)


async def list_webhooks(pool: AsyncConnectionPool) -> list[Webhook]:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.WEBHOOKS)
        return [_webhook(row) for row in await cursor.fetchall()]


async def get_webhook(pool: AsyncConnectionPool, *, webhook_id: UUID) -> Webhook:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.WEBHOOK, {"webhook_id": webhook_id})
        row = await cursor.fetchone()
    if row is None:
        raise NotFound("No such webhook.", code="webhook_not_found")
    return _webhook(row)


async def delete_webhook(pool: AsyncConnectionPool, *, webhook_id: UUID) -> None:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.WEBHOOK_DELETE, {"webhook_id": webhook_id})
        if await cursor.fetchone() is None:
            raise NotFound("No such webhook.", code="webhook_not_found")


async def rotate_secret(pool: AsyncConnectionPool, *, webhook_id: UUID, grace_hours: float) -> Webhook:
    async with pool.connection() as conn:
        cursor = await conn.execute(
            sql.WEBHOOK_ROTATE,
            {"webhook_id": webhook_id, "secret": new_secret(), "grace_seconds": grace_hours * 3600},
        )
        row = await cursor.fetchone()
    if row is None:
        raise NotFound("No such webhook.", code="webhook_not_found")
    return _webhook(row)


def _uuid7_floor(moment: datetime, slack_ms: int) -> UUID:
    ms = max(int(moment.timestamp() * 1000) + slack_ms, 0)
    return UUID(int=min(ms, 2**48 - 1) << 80)


async def replay(
    pool: AsyncConnectionPool,
    *,
    webhook_id: UUID,
    since: datetime | None = None,
    until: datetime | None = None,
    event_ids: list[UUID] | None = None,
) -> int:
    """Make the webhook's deliveries of the chosen events pending again (creating them if need be), with a
    fresh retry schedule. Returns how many. Either a time range (since < until) or event ids."""
    if event_ids is not None:
        if since is not None or until is not None:
            raise InvalidRequest("Give either since and until, or event_ids, not both.", code="invalid_replay")
        if not event_ids:
            raise InvalidRequest("event_ids: give at least one event id.", code="invalid_replay")
        statement = sql.REPLAY_IDS
        params: dict[str, Any] = {"event_ids": event_ids}
    else:
        if since is None or until is None:
            raise InvalidRequest("Give since and until (RFC 3339 with offset), or event_ids.", code="invalid_replay")
        if since.tzinfo is None or until.tzinfo is None:
            raise InvalidRequest("since, until: give a time zone offset, e.g. 2026-01-01T00:00:00Z.")
        if since >= until:
            raise InvalidRequest("since must be before until.", code="invalid_replay")
        statement = sql.REPLAY_RANGE
        params = {
            "since": since,
            "until": until,
            # ids and created_at come from two reads of the clock: a second of slack either side, then exact.
            "id_low": _uuid7_floor(since, -1000),
            "id_high": _uuid7_floor(until, 1000),
        }
    await get_webhook(pool, webhook_id=webhook_id)
    async with pool.connection() as conn:
        cursor = await conn.execute(statement, {**params, "webhook_id": webhook_id})
        row = await cursor.fetchone()
        await conn.execute(sql.WAKE_DISPATCHER)
    return int(row[0]) if row else 0


async def deliveries(
    pool: AsyncConnectionPool, *, webhook_id: UUID, status: str | None, limit: int, cursor: str | None
) -> tuple[list[str], str | None]:
    """The webhook's delivery log, newest first, as JSON texts; plus the next page's cursor, if any."""
    before = _MAX_UUID
    if cursor is not None:
        try:
            before = UUID(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            raise InvalidRequest("The cursor is not one this service issued.", code="invalid_cursor") from exc
    await get_webhook(pool, webhook_id=webhook_id)
    async with pool.connection() as conn:
        result = await conn.execute(
            sql.DELIVERIES, {"webhook_id": webhook_id, "before_id": before, "status": status, "limit": limit + 1}
        )
        rows = await result.fetchall()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = base64.urlsafe_b64encode(str(rows[limit - 1][0]).encode()).decode().rstrip("=")
    return [row[1] for row in rows[:limit]], next_cursor


async def recent(pool: AsyncConnectionPool, *, user_id: UUID, limit: int) -> list[str]:
    """The account's newest events first, as JSON texts (for looking, not for tailing: use `feed`)."""
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.RECENT, {"user_id": user_id, "limit": limit})
        return [row[0] for row in await cursor.fetchall()]
