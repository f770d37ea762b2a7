"""The console's SQL: its own sessions table only. Every ledger, hold and event read goes through those
domains' rules; nothing here touches their tables."""

from typing import LiteralString

SESSION_CREATE: LiteralString = """
INSERT INTO console_sessions (id_hash, service, user_id, subject, expires_at)
VALUES (%(id_hash)s, %(service)s, %(user_id)s, %(subject)s, now() + make_interval(secs => %(seconds)s))
RETURNING expires_at
"""

# Live only: not revoked and not expired, by the database's clock (all workers share it).
SESSION: LiteralString = """
SELECT service, user_id, subject, expires_at
FROM console_sessions
WHERE id_hash = %(id_hash)s AND revoked_at IS NULL AND expires_at > now()
"""

SESSION_REVOKE: LiteralString = """
UPDATE console_sessions SET revoked_at = now() WHERE id_hash = %(id_hash)s AND revoked_at IS NULL
"""

# Expired a day ago or more: gone. Revoked rows stay until then, so a replay within their lifetime is refused.
SESSIONS_PRUNE: LiteralString = """
DELETE FROM console_sessions WHERE expires_at < now() - interval '1 day'
"""
