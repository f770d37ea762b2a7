"""What makes two requests 'the same' under one Idempotency-Key, for every domain that writes."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC
from typing import Any


def request_hash(operation: str, **fields: Any) -> bytes:
    """What makes two requests 'the same' for an Idempotency-Key: the operation and its whole body."""
    canonical = json.dumps({"operation": operation, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).digest()


def posting_hash(
    operation: str, *, user_id: Any, amount: int, description: str, metadata: Any, terms: Any = None
) -> bytes:
    """`request_hash` of a charge or credit, byte for byte, at a third of its cost: the canonical JSON is
    written in its sorted key order directly instead of sorting a dict. Hashes already stored by keyed
    requests stay valid, so a retry across an upgrade still replays.

    A credit with grant terms other than the plain ones (ledger.rules.GrantTerms) hashes them too; a plain
    credit hashes exactly as before grants existed."""
    if terms is not None and terms != type(terms)():
        expires_at = terms.expires_at.astimezone(UTC).isoformat() if terms.expires_at is not None else None
        return request_hash(
            operation,
            user_id=str(user_id),
            amount=amount,
            description=description,
            metadata=metadata,
            priority=terms.priority,
            category=terms.category,
            expires_at=expires_at,
            source=terms.source,
        )
    canonical = (
        f'{{"amount":{amount},"description":{json.dumps(description)},'
        f'"metadata":{json.dumps(metadata, sort_keys=True, separators=(",", ":"), default=str)},'
        f'"operation":{json.dumps(operation)},"user_id":"{user_id}"}}'
    )
    return hashlib.sha256(canonical.encode()).digest()
