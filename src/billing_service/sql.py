"""Every SQL statement the service runs. Nothing else in the package writes SQL.

Each write is ONE statement, and so one round trip and one transaction (the pool runs in autocommit):
the conditional UPDATE of the account feeds the INSERT of its ledger row through a CTE, so the debit and
its row commit together or not at all, and no balance is ever read and then written.
"""

from collections.abc import Iterable
from typing import LiteralString

# The idempotency key, if any, already used by this user. Compared with the request's hash in Python.
_EXISTING = """
    existing AS (
        SELECT id, balance_after, request_hash
        FROM transactions
        WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
    )"""

_LEDGER_ROW_COLUMNS = "user_id, seq, type, amount, balance_after, description, metadata, idempotency_key, request_hash"

# Debit: the WHERE clause is the whole overdraft guard. Under READ COMMITTED a concurrent debit of the same
# row makes this one wait for the row lock, then re-check `balance >= amount` against the committed row
# (EvalPlanQual), so two debits can never both pass on the same funds. The CHECK constraint backs it up.
# A concurrent duplicate of the same Idempotency-Key passes NOT EXISTS (both saw no key), but the second
# INSERT then hits transactions_idempotency_key_unique and the whole statement rolls back: no double charge.
CHARGE: LiteralString = f"""
WITH {_EXISTING},
debited AS (
    UPDATE accounts
    SET balance = balance - %(amount)s, last_seq = last_seq + 1, updated_at = now()
    WHERE user_id = %(user_id)s
      -- Draws on available, not balance: tokens held for running agents are not for plain charges.
      AND balance - held >= %(amount)s
      AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING user_id, balance, last_seq
),
inserted AS (
    INSERT INTO transactions ({_LEDGER_ROW_COLUMNS})
    SELECT user_id, last_seq, 'debit', -%(amount)s, balance, %(description)s, %(metadata)s,
           %(idempotency_key)s, %(request_hash)s
    FROM debited
    RETURNING id, balance_after
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN a.user_id IS NULL THEN 'account_not_found'
            ELSE 'insufficient_balance' END AS outcome,
       coalesce(e.id, i.id) AS transaction_id,
       coalesce(e.balance_after, i.balance_after, a.balance - a.held) AS balance,
       e.request_hash
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
LEFT JOIN accounts a ON a.user_id = %(user_id)s
"""

# Credit: opens the account on first use. ON CONFLICT takes the row lock, so credits serialise like debits.
CREDIT: LiteralString = f"""
WITH {_EXISTING},
credited AS (
    INSERT INTO accounts AS a (user_id, balance, last_seq)
    SELECT %(user_id)s, %(amount)s, 1
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (user_id) DO UPDATE
    SET balance = a.balance + excluded.balance, last_seq = a.last_seq + 1, updated_at = now()
    RETURNING user_id, balance, last_seq
),
inserted AS (
    INSERT INTO transactions ({_LEDGER_ROW_COLUMNS})
    SELECT user_id, last_seq, 'credit', %(amount)s, balance, %(description)s, %(metadata)s,
           %(idempotency_key)s, %(request_hash)s
    FROM credited
    RETURNING id, balance_after
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed' ELSE 'applied' END AS outcome,
       coalesce(e.id, i.id) AS transaction_id,
       coalesce(e.balance_after, i.balance_after) AS balance,
       e.request_hash
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
"""

# After a unique violation on the key: the concurrent twin committed first, so its row is now visible.
IDEMPOTENT_REPLAY: LiteralString = """
SELECT id, balance_after, request_hash
FROM transactions
WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
"""

OPEN_ACCOUNT: LiteralString = """
INSERT INTO accounts (user_id, open_idempotency_key)
VALUES (%(user_id)s, %(idempotency_key)s)
ON CONFLICT (user_id) DO NOTHING
RETURNING balance
"""

ACCOUNT: LiteralString = """
SELECT balance, open_idempotency_key FROM accounts WHERE user_id = %(user_id)s
"""

BALANCE: LiteralString = """
SELECT balance FROM accounts WHERE user_id = %(user_id)s
"""

# History rows are rendered to JSON by PostgreSQL: the full history streams as text with no Python
# object per row, and the paged and streamed forms render each row identically.
_HISTORY_ROW = """
SELECT seq, json_build_object(
    'id', id, 'user_id', user_id, 'amount', amount, 'description', description,
    'created_at', created_at, 'type', type, 'balance_after', balance_after, 'metadata', metadata,
    'hold_id', hold_id
)::text
FROM transactions
"""

# Keyset pagination on (user_id, seq): seq is per-account and assigned under the row lock, so a page
# boundary never moves when new rows arrive (they only ever get a larger seq).
HISTORY_PAGE: LiteralString = f"""
{_HISTORY_ROW}
WHERE user_id = %(user_id)s AND seq < %(before_seq)s
ORDER BY seq DESC
LIMIT %(limit)s
"""

HISTORY_ALL: LiteralString = f"""
{_HISTORY_ROW}
WHERE user_id = %(user_id)s
ORDER BY seq DESC
"""

# The audit walks the ledger in (user_id, seq) order, the primary key's order, so it streams in bounded
# memory. A row's chain is broken when balance_after - amount is not the previous row's balance_after.
AUDIT: LiteralString = """
WITH chain AS (
    SELECT user_id, seq, amount, balance_after,
           lag(balance_after, 1, 0::bigint) OVER w AS previous_balance_after,
           lag(seq, 1, 0::bigint) OVER w AS previous_seq
    FROM transactions
    WINDOW w AS (PARTITION BY user_id ORDER BY seq)
),
ledger AS (
    SELECT user_id,
           sum(amount) AS ledger_sum,
           count(*) FILTER (WHERE balance_after - amount <> previous_balance_after) AS broken_links,
           count(*) FILTER (WHERE seq <> previous_seq + 1) AS seq_gaps,
           max(seq) AS last_seq
    FROM chain
    GROUP BY user_id
)
SELECT a.user_id, a.balance, coalesce(l.ledger_sum, 0) AS ledger_sum,
       coalesce(l.broken_links, 0) AS broken_links, coalesce(l.seq_gaps, 0) AS seq_gaps
FROM accounts a
LEFT JOIN ledger l USING (user_id)
WHERE a.balance <> coalesce(l.ledger_sum, 0)
   OR coalesce(l.broken_links, 0) > 0
   OR coalesce(l.seq_gaps, 0) > 0
   OR a.last_seq <> coalesce(l.last_seq, 0)
ORDER BY a.user_id
"""

COUNT_ACCOUNTS: LiteralString = "SELECT count(*) FROM accounts"

PING: LiteralString = "SELECT 1"


# ---------------------------------------------------------------------------------------------------------
# Holds: two-phase charges with leases, and nested run budgets.
#
# Accounting (see migration 0002): a hold's `remaining` is what it may still capture or carve; carving a
# child moves tokens from the parent's remaining into the child's; accounts.held = sum(remaining) of active
# holds, expired-but-unswept ones included. Charges and root holds guard on `balance - held` in one
# conditional UPDATE of the account row, so EvalPlanQual re-checks the guard against the committed row.
#
# Lock order, everywhere: the tree's root hold, then other holds of that tree, then the account row.
# Every statement that changes an existing tree runs in a transaction that first takes LOCK_TREE, so
# its next statement gets a fresh READ COMMITTED snapshot in which nobody else can change the tree:
# a child carved concurrently is seen by a release, and a capture and a release or expiry of the same
# hold are serialised. Expiry is compared with statement_timestamp(), never now(): the transaction may
# have waited for the lock, and now() is its start.
# ---------------------------------------------------------------------------------------------------------

# What a client sees of a hold. An active hold past its expires_at is expired, swept or not.
_HOLD_VIEW = """
    h.id, h.user_id, h.parent_id, h.root_id, cardinality(h.path) AS depth, h.amount,
    CASE WHEN h.status = 'active' AND h.expires_at <= statement_timestamp() THEN 0 ELSE h.remaining END
        AS remaining,
    h.captured,
    CASE WHEN h.status = 'active' AND h.expires_at <= statement_timestamp() THEN 'expired' ELSE h.status END
        AS status,
    h.expires_at, h.description, h.metadata, h.created_at"""

_NEW_HOLD_COLUMNS = (
    "user_id, id, parent_id, root_id, path, amount, remaining, description, metadata, expires_at, "
    "idempotency_key, request_hash"
)

# A root hold: reserves from available with the same single-row guard as CHARGE.
HOLD_CREATE: LiteralString = f"""
WITH existing AS (
    SELECT id, request_hash FROM holds
    WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
),
reserved AS (
    UPDATE accounts
    SET held = held + %(amount)s, updated_at = now()
    WHERE user_id = %(user_id)s
      AND balance - held >= %(amount)s
      AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING user_id
),
new_hold AS (SELECT billing_uuidv7() AS id),
inserted AS (
    INSERT INTO holds ({_NEW_HOLD_COLUMNS})
    SELECT r.user_id, n.id, NULL, n.id, ARRAY[n.id], %(amount)s, %(amount)s, %(description)s, %(metadata)s,
           statement_timestamp() + make_interval(secs => %(ttl_seconds)s), %(idempotency_key)s, %(request_hash)s
    FROM reserved r CROSS JOIN new_hold n
    RETURNING id
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN a.user_id IS NULL THEN 'account_not_found'
            ELSE 'insufficient_balance' END AS outcome,
       coalesce(e.id, i.id) AS hold_id,
       e.request_hash,
       a.balance - a.held AS available
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
LEFT JOIN accounts a ON a.user_id = %(user_id)s
"""

# After a unique violation on holds_idempotency_key_unique: the concurrent twin has committed.
HOLD_IDEMPOTENT_REPLAY: LiteralString = """
SELECT id, request_hash FROM holds WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
"""

# Takes the tree's lock: the root row. Found by hold id alone, since capture/release/extend name no user.
LOCK_TREE: LiteralString = """
SELECT h.user_id, h.root_id
FROM holds h
JOIN holds r ON r.user_id = h.user_id AND r.id = h.root_id
WHERE h.id = %(hold_id)s
FOR UPDATE OF r
"""

# Under the tree lock: expires what is due. Children never outlive their parent, so the due holds form
# whole subtrees; each subtree's remaining goes back to the (live) parent of its top, or to the account
# (held decreases) when its top is the root.
SWEEP_TREE: LiteralString = """
WITH due AS (
    SELECT id, parent_id, path, remaining FROM holds
    WHERE user_id = %(user_id)s AND root_id = %(root_id)s AND status = 'active'
      AND expires_at <= statement_timestamp()
),
tops AS (
    SELECT d.id, d.parent_id FROM due d WHERE NOT EXISTS (SELECT 1 FROM due p WHERE p.id = d.parent_id)
),
returned AS (
    SELECT t.parent_id, sum(d.remaining) AS amount
    FROM tops t JOIN due d ON t.id = ANY(d.path)
    GROUP BY t.parent_id
),
expired AS (
    UPDATE holds SET status = 'expired', remaining = 0, updated_at = clock_timestamp()
    WHERE user_id = %(user_id)s AND id IN (SELECT id FROM due)
),
to_parents AS (
    UPDATE holds h SET remaining = h.remaining + r.amount, updated_at = clock_timestamp()
    FROM returned r
    WHERE h.user_id = %(user_id)s AND h.id = r.parent_id
),
to_account AS (
    UPDATE accounts a SET held = a.held - r.amount, updated_at = now()
    FROM returned r
    WHERE a.user_id = %(user_id)s AND r.parent_id IS NULL
)
SELECT count(*) FROM due
"""

# A refused charge or hold may have been refused only because expired holds still count in `held`.
# The cheap look first (one index probe, no transaction), so a refusal with nothing to sweep costs one round trip.
HAS_EXPIRED_ROOTS: LiteralString = """
SELECT EXISTS (
    SELECT 1 FROM holds
    WHERE user_id = %(user_id)s AND parent_id IS NULL AND status = 'active' AND expires_at <= statement_timestamp()
)
"""

# Locks the expired roots in id order (two sweeps never deadlock), before the account row.
LOCK_EXPIRED_ROOTS: LiteralString = """
SELECT id FROM holds
WHERE user_id = %(user_id)s AND parent_id IS NULL AND status = 'active' AND expires_at <= statement_timestamp()
ORDER BY id
FOR UPDATE
"""

# Under the locks of LOCK_EXPIRED_ROOTS: an expired root's whole tree is expired (children never outlive it).
SWEEP_ROOTS: LiteralString = """
WITH due AS (
    SELECT id, remaining FROM holds
    WHERE user_id = %(user_id)s AND root_id = ANY(%(root_ids)s) AND status = 'active'
),
expired AS (
    UPDATE holds SET status = 'expired', remaining = 0, updated_at = clock_timestamp()
    WHERE user_id = %(user_id)s AND id IN (SELECT id FROM due)
)
UPDATE accounts
SET held = held - (SELECT coalesce(sum(remaining), 0) FROM due), updated_at = now()
WHERE user_id = %(user_id)s
"""

# Under the tree lock. A capture posts a ledger row like CHARGE (seq and balance_after under the account
# row lock). From the hold it takes min(amount, remaining); any excess (allow_overrun) must be covered by
# available, guarded on the account row itself. final: true also closes the sub-budgets below the hold;
# what it frees goes back to the parent hold, or to available when the hold is a root.
HOLD_CAPTURE: LiteralString = f"""
WITH {_EXISTING},
target AS (
    SELECT id, parent_id, remaining, status, description, expires_at > statement_timestamp() AS live
    FROM holds
    WHERE user_id = %(user_id)s AND id = %(hold_id)s
),
plan AS (
    SELECT id, parent_id,
           least(remaining, %(amount)s) AS from_hold,
           %(amount)s - least(remaining, %(amount)s) AS excess,
           CASE WHEN %(final)s THEN remaining - least(remaining, %(amount)s) ELSE 0 END AS rest
    FROM target
    WHERE status = 'active' AND live
      AND (remaining >= %(amount)s OR %(allow_overrun)s)
      AND NOT EXISTS (SELECT 1 FROM existing)
),
subtree AS (
    SELECT d.id, d.remaining
    FROM plan p
    JOIN holds d ON d.user_id = %(user_id)s AND d.root_id = %(root_id)s AND p.id = ANY(d.path)
    WHERE %(final)s AND d.id <> p.id AND d.status = 'active'
),
freed AS (
    SELECT p.parent_id, p.rest + (SELECT coalesce(sum(remaining), 0) FROM subtree) AS amount FROM plan p
),
debited AS (
    UPDATE accounts a
    SET balance = a.balance - %(amount)s,
        held = a.held - p.from_hold - CASE WHEN f.parent_id IS NULL THEN f.amount ELSE 0 END,
        last_seq = a.last_seq + 1,
        updated_at = now()
    FROM plan p CROSS JOIN freed f
    WHERE a.user_id = %(user_id)s AND a.balance - a.held >= p.excess
    RETURNING a.user_id, a.balance, a.last_seq
),
hold_captured AS (
    UPDATE holds h
    SET remaining = CASE WHEN %(final)s THEN 0 ELSE h.remaining - p.from_hold END,
        captured = h.captured + %(amount)s,
        status = CASE WHEN %(final)s THEN 'captured' ELSE h.status END,
        updated_at = clock_timestamp()
    FROM plan p CROSS JOIN debited
    WHERE h.user_id = %(user_id)s AND h.id = p.id
),
subtree_released AS (
    UPDATE holds h SET status = 'released', remaining = 0, updated_at = clock_timestamp()
    FROM subtree s CROSS JOIN debited
    WHERE h.user_id = %(user_id)s AND h.id = s.id
),
returned_to_parent AS (
    UPDATE holds h SET remaining = h.remaining + f.amount, updated_at = clock_timestamp()
    FROM freed f CROSS JOIN debited
    WHERE h.user_id = %(user_id)s AND h.id = f.parent_id AND f.amount > 0
),
inserted AS (
    INSERT INTO transactions ({_LEDGER_ROW_COLUMNS}, hold_id)
    SELECT d.user_id, d.last_seq, 'capture', -%(amount)s, d.balance,
           coalesce(%(description)s, (SELECT description FROM target)), %(metadata)s,
           %(idempotency_key)s, %(request_hash)s, %(hold_id)s
    FROM debited d
    RETURNING id, balance_after
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN t.id IS NULL THEN 'hold_not_found'
            WHEN t.status <> 'active' OR NOT t.live THEN 'hold_not_active'
            WHEN t.remaining < %(amount)s AND NOT %(allow_overrun)s THEN 'exceeds_hold'
            ELSE 'insufficient_balance' END AS outcome,
       coalesce(e.id, i.id) AS transaction_id,
       coalesce(e.balance_after, i.balance_after) AS balance,
       e.request_hash,
       t.remaining
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
LEFT JOIN target t ON true
"""

# The Idempotency-Key, if any, that this user already spent on a release or an extend (which create no row
# of their own to carry it). Compared with the request's hash in Python.
_EXISTING_HOLD_REQUEST = """
    existing AS (
        SELECT hold_id, request_hash FROM hold_requests
        WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
    )"""

# Under the tree lock. Releases the hold and every sub-budget still open below it; the freed tokens go back
# to the parent hold (which is live: children never outlive it), or to available for a root.
HOLD_RELEASE: LiteralString = f"""
WITH {_EXISTING_HOLD_REQUEST},
target AS (
    SELECT id, parent_id, status, expires_at > statement_timestamp() AS live
    FROM holds
    WHERE user_id = %(user_id)s AND id = %(hold_id)s
),
subtree AS (
    SELECT d.id, d.remaining
    FROM target t
    JOIN holds d ON d.user_id = %(user_id)s AND d.root_id = %(root_id)s AND t.id = ANY(d.path)
    WHERE t.status = 'active' AND t.live AND d.status = 'active' AND NOT EXISTS (SELECT 1 FROM existing)
),
freed AS (
    SELECT t.parent_id, sum(s.remaining) AS amount FROM target t CROSS JOIN subtree s GROUP BY t.parent_id
),
closed AS (
    UPDATE holds h SET status = 'released', remaining = 0, updated_at = clock_timestamp()
    FROM subtree s
    WHERE h.user_id = %(user_id)s AND h.id = s.id
),
to_parent AS (
    UPDATE holds h SET remaining = h.remaining + f.amount, updated_at = clock_timestamp()
    FROM freed f
    WHERE h.user_id = %(user_id)s AND h.id = f.parent_id
),
to_account AS (
    UPDATE accounts a SET held = a.held - f.amount, updated_at = now()
    FROM freed f
    WHERE a.user_id = %(user_id)s AND f.parent_id IS NULL
),
remembered AS (
    INSERT INTO hold_requests (user_id, idempotency_key, request_hash, hold_id)
    SELECT %(user_id)s, %(idempotency_key)s, %(request_hash)s, %(hold_id)s
    FROM freed
    WHERE %(idempotency_key)s::text IS NOT NULL
)
SELECT CASE WHEN e.hold_id IS NOT NULL THEN 'replayed'
            WHEN f.amount IS NOT NULL THEN 'applied'
            WHEN t.id IS NULL THEN 'hold_not_found'
            ELSE 'hold_not_active' END AS outcome,
       e.request_hash,
       f.amount AS released
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN freed f ON true
LEFT JOIN target t ON true
"""

# Under the tree lock. A lease: never shortens, and a child never outlives its parent.
HOLD_EXTEND: LiteralString = f"""
WITH {_EXISTING_HOLD_REQUEST},
target AS (
    SELECT h.id, h.status, h.expires_at > statement_timestamp() AS live, p.expires_at AS parent_expires_at
    FROM holds h
    LEFT JOIN holds p ON p.user_id = h.user_id AND p.id = h.parent_id
    WHERE h.user_id = %(user_id)s AND h.id = %(hold_id)s
),
extended AS (
    UPDATE holds h
    SET expires_at = least(coalesce(t.parent_expires_at, 'infinity'),
                           greatest(h.expires_at, statement_timestamp() + make_interval(secs => %(ttl_seconds)s))),
        updated_at = clock_timestamp()
    FROM target t
    WHERE h.user_id = %(user_id)s AND h.id = t.id AND t.status = 'active' AND t.live
      AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING h.id
),
remembered AS (
    INSERT INTO hold_requests (user_id, idempotency_key, request_hash, hold_id)
    SELECT %(user_id)s, %(idempotency_key)s, %(request_hash)s, %(hold_id)s
    FROM extended
    WHERE %(idempotency_key)s::text IS NOT NULL
)
SELECT CASE WHEN e.hold_id IS NOT NULL THEN 'replayed'
            WHEN x.id IS NOT NULL THEN 'applied'
            WHEN t.id IS NULL THEN 'hold_not_found'
            ELSE 'hold_not_active' END AS outcome,
       e.request_hash
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN extended x ON true
LEFT JOIN target t ON true
"""

# Under the tree lock. Carves a child out of the parent's remaining: held is unchanged, the tokens were
# already reserved. The child expires no later than its parent.
HOLD_CARVE: LiteralString = f"""
WITH existing AS (
    SELECT id, request_hash FROM holds
    WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
),
target AS (
    SELECT id, status, remaining, cardinality(path) AS depth, expires_at > statement_timestamp() AS live
    FROM holds
    WHERE user_id = %(user_id)s AND id = %(hold_id)s
),
parent AS (
    UPDATE holds h
    SET remaining = h.remaining - %(amount)s, updated_at = clock_timestamp()
    FROM target t
    WHERE h.user_id = %(user_id)s AND h.id = t.id AND t.status = 'active' AND t.live
      AND t.remaining >= %(amount)s AND t.depth < %(max_depth)s
      AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING h.user_id, h.id, h.root_id, h.path, h.expires_at
),
new_hold AS (SELECT billing_uuidv7() AS id),
inserted AS (
    INSERT INTO holds ({_NEW_HOLD_COLUMNS})
    SELECT p.user_id, n.id, p.id, p.root_id, p.path || n.id, %(amount)s, %(amount)s, %(description)s,
           %(metadata)s, least(p.expires_at, statement_timestamp() + make_interval(secs => %(ttl_seconds)s)),
           %(idempotency_key)s, %(request_hash)s
    FROM parent p CROSS JOIN new_hold n
    RETURNING id
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN t.id IS NULL THEN 'hold_not_found'
            WHEN t.status <> 'active' OR NOT t.live THEN 'hold_not_active'
            WHEN t.depth >= %(max_depth)s THEN 'depth_limit'
            ELSE 'exceeds_hold' END AS outcome,
       coalesce(e.id, i.id) AS hold_id,
       e.request_hash,
       t.remaining
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
LEFT JOIN target t ON true
"""

HOLD: LiteralString = f"""
SELECT {_HOLD_VIEW}
FROM holds h
WHERE h.id = %(hold_id)s
"""

# The hold and its whole subtree, parents before children.
HOLD_TREE: LiteralString = f"""
SELECT {_HOLD_VIEW}
FROM holds t
JOIN holds h ON h.user_id = t.user_id AND h.root_id = t.root_id AND t.id = ANY(h.path)
WHERE t.id = %(hold_id)s
ORDER BY cardinality(h.path), h.id
"""

# Newest first; the status filter is one of HOLD_STATUS_FILTERS.
HOLDS_OF_USER: LiteralString = f"""
SELECT {_HOLD_VIEW}
FROM holds h
WHERE h.user_id = %(user_id)s AND h.id < %(before_id)s {{status_filter}}
ORDER BY h.id DESC
LIMIT %(limit)s
"""

HOLD_STATUS_FILTERS: dict[str, LiteralString] = {
    "any": "",
    "active": "AND h.status = 'active' AND h.expires_at > statement_timestamp()",
    "expired": "AND (h.status = 'expired' OR (h.status = 'active' AND h.expires_at <= statement_timestamp()))",
    "captured": "AND h.status = 'captured'",
    "released": "AND h.status = 'released'",
}


def holds_of_user(status: str) -> LiteralString:
    return HOLDS_OF_USER.replace("{status_filter}", HOLD_STATUS_FILTERS[status])


# Exact even with no sweeper: `held` minus what active roots past their expiry (and so their whole trees)
# still reserve. One statement, one snapshot.
BALANCE_WITH_HOLDS: LiteralString = """
SELECT a.balance,
       a.held - coalesce((
           SELECT sum(h.remaining)
           FROM holds r
           JOIN holds h ON h.user_id = r.user_id AND h.root_id = r.id AND h.status = 'active'
           WHERE r.user_id = a.user_id AND r.parent_id IS NULL AND r.status = 'active'
             AND r.expires_at <= statement_timestamp()
       ), 0) AS held
FROM accounts a
WHERE a.user_id = %(user_id)s
"""

# created_at is clock_timestamp() taken under the account row lock, so it rises with seq: the last row at
# or before T carries the balance at T. One backward step of transactions_user_created_at.
BALANCE_AT: LiteralString = """
SELECT coalesce((
    SELECT t.balance_after FROM transactions t
    WHERE t.user_id = a.user_id AND t.created_at <= %(at)s
    ORDER BY t.created_at DESC, t.seq DESC
    LIMIT 1
), 0)
FROM accounts a
WHERE a.user_id = %(user_id)s
"""

# Spend (debits and captures) per group, rendered to JSON by PostgreSQL. Token counts are summed only where
# the metadata holds a JSON number, so no stored metadata can make the rollup fail.
_USAGE = """
SELECT json_build_object(
    'group', {group_key},
    'tokens', sum(-t.amount),
    'transactions', count(*),
    'input_tokens', sum(CASE WHEN jsonb_typeof(t.metadata -> 'input_tokens') = 'number'
                             THEN (t.metadata ->> 'input_tokens')::numeric END),
    'output_tokens', sum(CASE WHEN jsonb_typeof(t.metadata -> 'output_tokens') = 'number'
                              THEN (t.metadata ->> 'output_tokens')::numeric END),
    'cached_tokens', sum(CASE WHEN jsonb_typeof(t.metadata -> 'cached_tokens') = 'number'
                              THEN (t.metadata ->> 'cached_tokens')::numeric END),
    'first_at', min(t.created_at),
    'last_at', max(t.created_at)
)::text
FROM transactions t
WHERE t.user_id = %(user_id)s AND t.type IN ('debit', 'capture')
  AND t.created_at >= %(since)s AND t.created_at < %(until)s
GROUP BY {group_key}
ORDER BY {group_key} NULLS FIRST
"""

USAGE_GROUP_KEYS: dict[str, LiteralString] = {
    "run_id": "t.metadata ->> 'run_id'",
    "model": "t.metadata ->> 'model'",
    "day": "to_char(t.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}


def usage(group_by: str) -> LiteralString:
    return _USAGE.replace("{group_key}", USAGE_GROUP_KEYS[group_by])


# History filters, each served by an index: run_id by transactions_user_run_id, since/until by
# transactions_user_created_at. Appended to the WHERE of HISTORY_PAGE / HISTORY_ALL.
HISTORY_FILTERS: dict[str, LiteralString] = {
    "run_id": " AND metadata ->> 'run_id' = %(run_id)s",
    "type": " AND type = %(type)s",
    "since": " AND created_at >= %(since)s",
    "until": " AND created_at < %(until)s",
}


def filtered_history(base: LiteralString, filters: Iterable[str]) -> LiteralString:
    """HISTORY_PAGE or HISTORY_ALL with the named filters added to its WHERE clause."""
    where: LiteralString = "".join(HISTORY_FILTERS[name] for name in sorted(filters))
    return base.replace("ORDER BY", where + "\nORDER BY")


# Hold accounting, for `billing audit`: one row per problem found, in one snapshot. Run without
# parameters, so its % signs reach PostgreSQL as they are.
HOLD_AUDIT: LiteralString = """
WITH reserved AS (
    SELECT user_id, sum(remaining) AS remaining FROM holds WHERE status = 'active' GROUP BY user_id
),
captures AS (
    SELECT user_id, hold_id, -sum(amount) AS captured
    FROM transactions WHERE hold_id IS NOT NULL
    GROUP BY user_id, hold_id
)
SELECT a.user_id, NULL::uuid AS hold_id,
       format('held is %s but active holds reserve %s', a.held, coalesce(r.remaining, 0)) AS problem
FROM accounts a LEFT JOIN reserved r USING (user_id)
WHERE a.held <> coalesce(r.remaining, 0)
UNION ALL
SELECT h.user_id, h.id, format('captured is %s but its ledger captures sum to %s', h.captured, coalesce(c.captured, 0))
FROM holds h LEFT JOIN captures c ON c.user_id = h.user_id AND c.hold_id = h.id
WHERE h.captured <> coalesce(c.captured, 0)
UNION ALL
SELECT c.user_id, c.id, format('active under a %s parent', p.status)
FROM holds c JOIN holds p ON p.user_id = c.user_id AND p.id = c.parent_id
WHERE c.status = 'active' AND p.status <> 'active'
UNION ALL
SELECT c.user_id, c.id, 'expires after its parent'
FROM holds c JOIN holds p ON p.user_id = c.user_id AND p.id = c.parent_id
WHERE c.status = 'active' AND c.expires_at > p.expires_at
ORDER BY 1, 2 NULLS FIRST
"""


# ---------------------------------------------------------------------------------------------------------
# Batched charges (batcher.py): one transaction for many charges, decided in Python under the row locks.

# Sorted, so every batch takes its locks in the same order and two batches can never deadlock.
BATCH_LOCK_ACCOUNTS: LiteralString = """
SELECT user_id, balance, held, last_seq
FROM accounts
WHERE user_id = ANY(%(user_ids)s)
ORDER BY user_id
FOR UPDATE
"""

# A separate statement after the locks, so its snapshot sees keys committed by whoever held them before us.
BATCH_EXISTING_KEYS: LiteralString = """
SELECT t.user_id, t.idempotency_key, t.id, t.balance_after, t.request_hash
FROM unnest(%(user_ids)s::uuid[], %(idempotency_keys)s::text[]) AS k(user_id, idempotency_key)
JOIN transactions t ON t.user_id = k.user_id AND t.idempotency_key = k.idempotency_key
"""

# The plan was computed from the locked rows, so setting the final balance and seq is exact; the CHECK
# constraints and `billing audit` would catch a plan that broke the chain.
BATCH_APPLY: LiteralString = """
WITH planned AS (
    SELECT *
    FROM unnest(%(user_ids)s::uuid[], %(seqs)s::bigint[], %(amounts)s::bigint[], %(balances_after)s::bigint[],
                %(descriptions)s::text[], %(metadata)s::text[], %(idempotency_keys)s::text[],
                %(request_hashes)s::bytea[])
         AS p(user_id, seq, amount, balance_after, description, metadata, idempotency_key, request_hash)
),
inserted AS (
    INSERT INTO transactions
        (user_id, seq, type, amount, balance_after, description, metadata, idempotency_key, request_hash)
    SELECT user_id, seq, 'debit', -amount, balance_after, description, metadata::jsonb, idempotency_key,
           request_hash
    FROM planned
    ORDER BY user_id, seq
    RETURNING user_id, seq, id
),
newest AS (
    SELECT DISTINCT ON (user_id) user_id, seq, balance_after FROM planned ORDER BY user_id, seq DESC
),
updated AS (
    UPDATE accounts a
    SET balance = n.balance_after, last_seq = n.seq, updated_at = now()
    FROM newest n
    WHERE a.user_id = n.user_id
)
SELECT user_id, seq, id FROM inserted
"""

# Scraped by /metrics, not run per request. Expired holds not yet swept still reserve their tokens
# (accounts.held counts them), so they count here too.
ACTIVE_HOLDS: LiteralString = """
SELECT count(*), coalesce(sum(remaining), 0) FROM holds WHERE status = 'active'
"""
