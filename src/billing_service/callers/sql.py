# ruff: noqa: S105 - "TOKEN" in these names is a table of hashes, not a password
"""The callers' SQL: service tokens kept in the database, and the rate limiter's shared demand table."""

from typing import LiteralString

# A name is unique among all tokens ever made (revoked ones included), so `posted_by` never means two tokens.
TOKEN_CREATE: LiteralString = """
INSERT INTO service_tokens (id, name, scopes, token_hash)
VALUES (%(id)s, %(name)s, %(scopes)s, %(token_hash)s)
RETURNING created_at
"""

TOKEN_LIST: LiteralString = """
SELECT name, scopes, created_at, last_used_at, revoked_at
FROM service_tokens
ORDER BY created_at, name
"""

TOKEN_REVOKE: LiteralString = """
UPDATE service_tokens SET revoked_at = now()
WHERE name = %(name)s AND revoked_at IS NULL
RETURNING id
"""

TOKEN_NAMES: LiteralString = "SELECT name FROM service_tokens"

# What each worker keeps in memory and refreshes every second: only the hashes, never a secret.
ACTIVE_TOKENS: LiteralString = """
SELECT id, name, scopes, token_hash FROM service_tokens WHERE revoked_at IS NULL
"""

# Best effort and coarse: within a refresh interval of the real last use.
TOKENS_USED: LiteralString = """
UPDATE service_tokens SET last_used_at = now() WHERE id = ANY(%(ids)s) AND revoked_at IS NULL
"""

# ---------------------------------------------------------------------------------------------------------
# Rate limits: each worker publishes its recent request rate per key, and reads everyone else's.

DEMAND_PUBLISH: LiteralString = """
INSERT INTO rate_limit_demand AS d (key, worker, demand, seen_at)
SELECT key, %(worker)s, demand, now()
FROM unnest(%(keys)s::text[], %(demands)s::float8[]) AS u(key, demand)
ON CONFLICT (key, worker) DO UPDATE SET demand = excluded.demand, seen_at = excluded.seen_at
"""

# Other workers' demand for the keys this worker limits, and how many workers are alive (the '' key is
# every worker's heartbeat). Rows older than the horizon are workers that went quiet or died.
DEMAND_OF_OTHERS: LiteralString = """
SELECT key, sum(demand)::float8, count(*)::int
FROM rate_limit_demand
WHERE worker <> %(worker)s AND key = ANY(%(keys)s) AND seen_at > now() - make_interval(secs => %(horizon)s)
GROUP BY key
"""

DEMAND_FORGET: LiteralString = """
DELETE FROM rate_limit_demand WHERE seen_at < now() - make_interval(secs => %(horizon)s)
"""
