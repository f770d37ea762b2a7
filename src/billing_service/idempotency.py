"""What makes two requests 'the same' under one Idempotency-Key, for every domain that writes."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def request_hash(operation: str, **fields: Any) -> bytes:
    """What makes two requests 'the same' for an Idempotency-Key: the operation and its whole body."""
    canonical = json.dumps({"operation": operation, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).digest()
