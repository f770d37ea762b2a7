"""Events: the outbox's readers (the feed), webhooks and their deliveries. No HTTP here.

The outbox itself is written by the ledger's and holds' statements (events/sql.py fragments); this module
reads it, manages webhooks, and holds the one event written outside those statements: balance.depleted.
"""

from __future__ import annotations

from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.events import config, sql


async def notify_depleted(pool: AsyncConnectionPool, *, user_id: UUID, amount: int, operation: str) -> None:
    """Write balance.depleted for a refusal, unless one was written since the account's last credit."""
    if not config.enabled:
        return
    async with pool.connection() as conn:
        await conn.execute(
            sql.DEPLETED, {"user_id": user_id, "amount": amount, "operation": operation, "events": config.enabled}
        )
