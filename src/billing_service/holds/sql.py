"""The holds' SQL: two-phase charges with leases, and nested run budgets.

Accounting (see migration 0002): a hold's `remaining` is what it may still capture or carve; carving a
child moves tokens from the parent's remaining into the child's; accounts.held = sum(remaining) of active
holds, expired-but-unswept ones included. Charges and root holds guard on `balance - held` in one
conditional UPDATE of the account row, so EvalPlanQual re-checks the guard against the committed row.

Lock order, everywhere: the tree's root hold, then other holds of that tree, then the account row.
Every statement that changes an existing tree runs in a transaction that first takes LOCK_TREE, so
its next statement gets a fresh READ COMMITTED snapshot in which nobody else can change the tree:
a child carved concurrently is seen by a release, and a capture and a release or expiry of the same
hold are serialised. Expiry is compared with statement_timestamp(), never now(): the transaction may
have waited for the lock, and now() is its start.
"""

from typing import LiteralString

from billing_service.events.sql import (
    ACCOUNT_RETURNING,
    EVENT_COLUMNS,
    HOLD_RETURNING,
    LEDGER_RETURNING,
    POSTED_DATA,
    hold_data,
    low_event,
    lowering_set,
    raising_set,
    txid_set,
)
from billing_service.ledger.sql import (
    BATCH_POSTED_EVENTS,
    DRAW_SET,
    EXISTING_TRANSACTION,
    IDEMPOTENT_REPLAY,
    LEDGER_ROW_COLUMNS,
    NOTHING_DUE,
    batch_ledger_rows,
)

__all__ = ["IDEMPOTENT_REPLAY"]  # a capture's key race replays from the ledger row

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
    "idempotency_key, request_hash, posted_by, request_id"
)


def _return_trees(which: LiteralString) -> LiteralString:
    """SET clause of an UPDATE of accounts `a`: the allocations (hold_funding `hf`) of the trees that `which`
    selects go back to the grants they came from. The statement empties them with _empty_trees(which)."""
    return f"""(grants, next_expiry) = (
            SELECT r.new_slots, r.next_expiry FROM billing_return(a.grants, a.user_id, (
                SELECT jsonb_agg(jsonb_build_object('grant_id', hf.grant_id, 'amount', hf.amount))
                FROM hold_funding hf WHERE hf.user_id = a.user_id AND hf.amount > 0 AND {which})) r)"""


def _empty_trees(which: LiteralString, after: LiteralString) -> LiteralString:
    """A CTE body: zero the allocations _return_trees(which) gave back, once the CTE `after` wrote the account."""
    return f"""UPDATE hold_funding hf SET amount = 0
    FROM (SELECT DISTINCT user_id FROM {after}) w
    WHERE hf.user_id = w.user_id AND hf.amount > 0 AND {which}"""


# A root hold: reserves from available with the same single-row guard as CHARGE.
HOLD_CREATE: LiteralString = f"""
WITH existing AS (
    SELECT id, request_hash FROM holds
    WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
),
reserved AS (
    UPDATE accounts
    SET held = held + %(amount)s,
        {DRAW_SET},
        {lowering_set("balance - held - %(amount)s")}
    WHERE user_id = %(user_id)s
      AND balance - held >= %(amount)s
      AND {NOTHING_DUE}
      AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING user_id, last_draw, {ACCOUNT_RETURNING}
),
new_hold AS (SELECT billing_uuidv7() AS id),
inserted AS (
    INSERT INTO holds ({_NEW_HOLD_COLUMNS})
    SELECT r.user_id, n.id, NULL, n.id, ARRAY[n.id], %(amount)s, %(amount)s, %(description)s, %(metadata)s,
           statement_timestamp() + make_interval(secs => %(ttl_seconds)s), %(idempotency_key)s, %(request_hash)s,
           %(posted_by)s, %(request_id)s
    FROM reserved r CROSS JOIN new_hold n
    RETURNING {HOLD_RETURNING}
),
-- The tree's allocation: which grants the reserved tokens came from, for captures to draw and returns to refill.
funded AS (
    INSERT INTO hold_funding (user_id, root_id, grant_id, amount)
    SELECT r.user_id, i.id, (f ->> 'grant_id')::uuid, (f ->> 'amount')::bigint
    FROM reserved r CROSS JOIN inserted i CROSS JOIN jsonb_array_elements(r.last_draw) AS f
),
outbox AS (
    {EVENT_COLUMNS}
    SELECT r.user_id, r.last_event_seq - r.crossed::int, 'hold.created', {hold_data("h")}, r.last_event_txid
    FROM reserved r CROSS JOIN inserted h
    WHERE %(events)s
    UNION ALL
    {low_event("reserved")}
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

# The tree's root itself expired (so the whole tree did): its allocation goes back to the grants.
_ROOT_EXPIRED: LiteralString = (
    "hf.root_id = %(root_id)s AND EXISTS (SELECT 1 FROM holds x WHERE x.user_id = hf.user_id AND x.id = hf.root_id"
    " AND x.status = 'active' AND x.expires_at <= statement_timestamp())"
)

# Under the tree lock: expires what is due. Children never outlive their parent, so the due holds form
# whole subtrees; each subtree's remaining goes back to the (live) parent of its top, or to the account
# (held decreases) when its top is the root.
SWEEP_TREE: LiteralString = f"""
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
    RETURNING {HOLD_RETURNING}
),
to_parents AS (
    UPDATE holds h SET remaining = h.remaining + r.amount, updated_at = clock_timestamp()
    FROM returned r
    WHERE h.user_id = %(user_id)s AND h.id = r.parent_id
),
to_root AS (SELECT coalesce(sum(amount), 0) AS amount FROM returned WHERE parent_id IS NULL),
-- The account row is written when the root's tokens come back, or when there are events to number.
to_account AS (
    UPDATE accounts a
    SET held = a.held - r.amount, updated_at = now(),
        {_return_trees(_ROOT_EXPIRED)},
        {raising_set("a.balance - a.held + r.amount", "(SELECT count(*) FROM due)", prefix="a.")}
    FROM to_root r
    WHERE a.user_id = %(user_id)s AND (r.amount > 0 OR (%(events)s AND EXISTS (SELECT 1 FROM due)))
    RETURNING a.user_id, a.last_event_seq, a.last_event_txid
),
emptied AS ({_empty_trees(_ROOT_EXPIRED, "to_account")}),
outbox AS (
    {EVENT_COLUMNS}
    SELECT t.user_id, t.last_event_seq - (SELECT count(*) FROM due) + row_number() OVER (ORDER BY h.path, h.id),
           'hold.expired', {hold_data("h")}, t.last_event_txid
    FROM expired h CROSS JOIN to_account t
    WHERE %(events)s
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
SWEEP_ROOTS: LiteralString = f"""
WITH due AS (
    SELECT id, remaining FROM holds
    WHERE user_id = %(user_id)s AND root_id = ANY(%(root_ids)s) AND status = 'active'
),
expired AS (
    UPDATE holds SET status = 'expired', remaining = 0, updated_at = clock_timestamp()
    WHERE user_id = %(user_id)s AND id IN (SELECT id FROM due)
    RETURNING {HOLD_RETURNING}
),
freed AS (SELECT coalesce(sum(remaining), 0) AS amount, count(*) AS holds FROM due),
to_account AS (
    UPDATE accounts a
    SET held = a.held - f.amount, updated_at = now(),
        {_return_trees("hf.root_id = ANY(%(root_ids)s)")},
        {raising_set("a.balance - a.held + f.amount", "f.holds", prefix="a.")}
    FROM freed f
    WHERE a.user_id = %(user_id)s
    RETURNING a.user_id, a.last_event_seq, a.last_event_txid, f.holds
),
emptied AS ({_empty_trees("hf.root_id = ANY(%(root_ids)s)", "to_account")}),
outbox AS (
    {EVENT_COLUMNS}
    SELECT t.user_id, t.last_event_seq - t.holds + row_number() OVER (ORDER BY h.path, h.id),
           'hold.expired', {hold_data("h")}, t.last_event_txid
    FROM expired h CROSS JOIN to_account t
    WHERE %(events)s
)
SELECT count(*) FROM due
"""

_CAPTURE_AVAILABLE = (
    "(a.balance - %(amount)s) - (a.held - p.from_hold - CASE WHEN f.parent_id IS NULL THEN f.amount ELSE 0 END)"
)

# Under the tree lock. A capture posts a ledger row like CHARGE (seq and balance_after under the account
# row lock). From the hold it takes min(amount, remaining); any excess (allow_overrun) must be covered by
# available, guarded on the account row itself. final: true also closes the sub-budgets below the hold;
# what it frees goes back to the parent hold, or to available when the hold is a root.
HOLD_CAPTURE: LiteralString = f"""
WITH {EXISTING_TRANSACTION},
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
-- What the capture takes from the tree's allocation: its reserved tokens, in the grants' draw order. They
-- were reserved while their grants were live, so they stay spendable by the tree after those grants expire.
allocation AS (
    SELECT f.grant_id, f.amount,
           sum(f.amount) OVER (ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id) AS through
    FROM hold_funding f JOIN grants g ON g.user_id = f.user_id AND g.id = f.grant_id
    WHERE f.user_id = %(user_id)s AND f.root_id = %(root_id)s AND f.amount > 0
),
taken AS (
    SELECT a.grant_id, a.amount, a.through,
           least(a.amount, greatest(p.from_hold - (a.through - a.amount), 0)) AS taken,
           -- A final capture of the root closes the tree: what it did not take goes back to the grants.
           (%(final)s AND p.parent_id IS NULL) AS closes_tree
    FROM allocation a CROSS JOIN plan p
),
debited AS (
    UPDATE accounts a
    SET balance = a.balance - %(amount)s,
        held = a.held - p.from_hold - CASE WHEN f.parent_id IS NULL THEN f.amount ELSE 0 END,
        last_seq = a.last_seq + 1,
        -- The overrun (beyond the hold) is drawn from the live grants, after the closed tree's rest is back.
        (grants, last_draw, next_expiry, updated_at) = (
            SELECT d.new_slots, d.funding, d.next_expiry, d.drawn_at
            FROM billing_draw((billing_return(a.grants, a.user_id, (
                SELECT jsonb_agg(jsonb_build_object('grant_id', t.grant_id, 'amount', t.amount - t.taken))
                FROM taken t WHERE t.closes_tree AND t.amount > t.taken))).new_slots, p.excess) d),
        {lowering_set(_CAPTURE_AVAILABLE, "1 + %(final)s::int", "a.", f"{_CAPTURE_AVAILABLE} < a.balance - a.held")}
    FROM plan p CROSS JOIN freed f
    WHERE a.user_id = %(user_id)s AND a.balance - a.held >= p.excess AND {NOTHING_DUE}
    RETURNING a.user_id, a.last_seq, a.balance, a.held, a.low_balance_threshold, a.last_event_seq, a.last_event_txid,
              a.last_draw, a.updated_at,
              (%(events)s AND coalesce(a.low_balance_event_seq = a.last_event_seq, false)) AS crossed
),
allocation_spent AS (
    UPDATE hold_funding f SET amount = CASE WHEN t.closes_tree THEN 0 ELSE f.amount - t.taken END
    FROM taken t CROSS JOIN debited
    WHERE f.user_id = %(user_id)s AND f.root_id = %(root_id)s AND f.grant_id = t.grant_id
      AND (t.taken > 0 OR t.closes_tree)
),
hold_captured AS (
    UPDATE holds h
    SET remaining = CASE WHEN %(final)s THEN 0 ELSE h.remaining - p.from_hold END,
        captured = h.captured + %(amount)s,
        status = CASE WHEN %(final)s THEN 'captured' ELSE h.status END,
        updated_at = clock_timestamp()
    FROM plan p CROSS JOIN debited
    WHERE h.user_id = %(user_id)s AND h.id = p.id
    RETURNING h.id, h.user_id, h.parent_id, h.root_id, h.path, h.amount, h.remaining, h.captured, h.status,
              h.expires_at, h.description, h.metadata, h.created_at
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
    INSERT INTO transactions ({LEDGER_ROW_COLUMNS}, hold_id, created_at)
    SELECT d.user_id, d.last_seq, 'capture', -%(amount)s, d.balance,
           coalesce(%(description)s, (SELECT description FROM target)), %(metadata)s,
           %(idempotency_key)s, %(request_hash)s, %(posted_by)s, %(request_id)s,
           -- From the reservation, then the overrun's draw: one entry per grant, in the order they were drawn.
           (SELECT coalesce(jsonb_agg(jsonb_build_object('grant_id', u.grant_id, 'amount', u.amount) ORDER BY u.n),
                            '[]')
            FROM (SELECT grant_id, sum(amount) AS amount, min(n) AS n FROM (
                      SELECT t.grant_id, t.taken AS amount, t.through AS n FROM taken t WHERE t.taken > 0
                      UNION ALL
                      SELECT (f.entry ->> 'grant_id')::uuid, (f.entry ->> 'amount')::bigint, 2^62 + f.n
                      FROM jsonb_array_elements(d.last_draw) WITH ORDINALITY AS f(entry, n)
                  ) drawn GROUP BY grant_id) u),
           %(hold_id)s, d.updated_at
    FROM debited d
    RETURNING {LEDGER_RETURNING}
),
-- Every capture is a ledger row: transaction.posted; a final one also closes the hold: hold.captured.
outbox AS (
    {EVENT_COLUMNS}
    SELECT d.user_id, d.last_event_seq - d.crossed::int - %(final)s::int, 'transaction.posted', {POSTED_DATA},
           d.last_event_txid
    FROM debited d CROSS JOIN inserted i
    WHERE %(events)s
    UNION ALL
    SELECT d.user_id, d.last_event_seq - d.crossed::int, 'hold.captured', {hold_data("h")}, d.last_event_txid
    FROM debited d CROSS JOIN hold_captured h
    WHERE %(events)s AND %(final)s
    UNION ALL
    {low_event("debited")}
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN t.id IS NULL THEN 'hold_not_found'
            WHEN t.status <> 'active' OR NOT t.live THEN 'hold_not_active'
            WHEN t.remaining < %(amount)s AND NOT %(allow_overrun)s THEN 'exceeds_hold'
            WHEN NOT (SELECT {NOTHING_DUE} FROM accounts WHERE user_id = %(user_id)s) THEN 'grants_due'
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

# ---------------------------------------------------------------------------------------------------------
# The capture batcher (holds/batcher.py): the captures one worker receives while its previous batch commits,
# decided in Python under the same locks as HOLD_CAPTURE and applied together in one transaction. It takes only
# the plain case (not final, no overrun, the hold live with enough remaining, nothing due in its tree or
# account, a key not seen before); everything else goes to HOLD_CAPTURE, one capture at a time.

# The batch's trees: their root rows, in id order (the order of LOCK_EXPIRED_ROOTS, so no two lockers of
# several roots can deadlock), before any account row, as everywhere.
BATCH_LOCK_TREES: LiteralString = """
SELECT r.id
FROM holds r
WHERE (r.user_id, r.id) IN (SELECT h.user_id, h.root_id FROM holds h WHERE h.id = ANY(%(hold_ids)b::uuid[]))
ORDER BY r.id
FOR UPDATE
"""

# Then their accounts, in user_id order (the charge batcher's order), each as the locked row is now.
BATCH_LOCK_ACCOUNTS: LiteralString = """
SELECT user_id, balance, held, last_seq, last_event_seq, low_balance_threshold, low_balance_armed, next_expiry
FROM accounts
WHERE user_id IN (SELECT h.user_id FROM holds h WHERE h.id = ANY(%(hold_ids)b::uuid[]))
ORDER BY user_id
FOR UPDATE
"""

# Under those locks, a fresh snapshot (READ COMMITTED: this statement starts after the locks were granted):
# each hold as stored, the soonest lease among its tree's active holds (anything due makes the capture take the
# sweeping path), and the batch's instant, as of which every capture of the batch is decided and stamped.
BATCH_CAPTURE_HOLDS: LiteralString = """
WITH instant AS (SELECT clock_timestamp() AS planned_at)
SELECT h.id, h.user_id, h.parent_id, h.root_id, cardinality(h.path), h.amount, h.remaining, h.captured, h.status,
       h.expires_at, h.description, h.metadata, h.created_at,
       (SELECT min(d.expires_at) FROM holds d
        WHERE d.user_id = h.user_id AND d.root_id = h.root_id AND d.status = 'active') AS tree_next_expiry,
       i.planned_at
FROM holds h CROSS JOIN instant i
WHERE h.id = ANY(%(hold_ids)b::uuid[])
"""

# The trees' allocations, each in the grants' draw order (HOLD_CAPTURE's `allocation`).
BATCH_CAPTURE_ALLOCATIONS: LiteralString = """
SELECT f.user_id, f.root_id, f.grant_id, f.amount
FROM hold_funding f JOIN grants g ON g.user_id = f.user_id AND g.id = f.grant_id
WHERE (f.user_id, f.root_id) IN (SELECT h.user_id, h.root_id FROM holds h WHERE h.id = ANY(%(hold_ids)b::uuid[]))
  AND f.amount > 0
ORDER BY f.user_id, f.root_id, g.priority, g.expires_at NULLS LAST, g.created_at, g.id
"""

# The batch's Idempotency-Keys that the hold's user has already spent (on any ledger row).
BATCH_CAPTURE_KEYS: LiteralString = """
SELECT k.hold_id, k.idempotency_key
FROM json_to_recordset(%(keys)s::json) AS k(hold_id uuid, idempotency_key text)
JOIN holds h ON h.id = k.hold_id
JOIN transactions t ON t.user_id = h.user_id AND t.idempotency_key = k.idempotency_key
"""

# The plan, set-based: the ledger rows (type capture), their transaction.posted events numbered from the
# locked rows, and the new values of the accounts, holds and allocations the plan computed. Every row written
# here is locked by the statements above, so the plan's values are what the rows become.
BATCH_CAPTURE_APPLY: LiteralString = f"""
WITH {batch_ledger_rows("capture")},
outbox AS (
    {EVENT_COLUMNS}
    {BATCH_POSTED_EVENTS}
),
accounts_captured AS (
    UPDATE accounts a
    SET balance = s.balance, held = s.held, last_seq = s.last_seq, last_event_seq = s.last_event_seq,
        low_balance_armed = s.armed, {txid_set("a.")}, updated_at = %(planned_at)s
    FROM json_to_recordset(%(accounts)s::json)
         AS s(user_id uuid, balance bigint, held bigint, last_seq bigint, last_event_seq bigint, armed boolean)
    WHERE a.user_id = s.user_id
),
holds_captured AS (
    UPDATE holds h SET remaining = s.remaining, captured = s.captured, updated_at = %(planned_at)s
    FROM json_to_recordset(%(holds)s::json) AS s(user_id uuid, id uuid, remaining bigint, captured bigint)
    WHERE h.user_id = s.user_id AND h.id = s.id
),
allocations_spent AS (
    UPDATE hold_funding f SET amount = s.amount
    FROM json_to_recordset(%(allocations)s::json) AS s(user_id uuid, root_id uuid, grant_id uuid, amount bigint)
    WHERE f.user_id = s.user_id AND f.root_id = s.root_id AND f.grant_id = s.grant_id
)
SELECT user_id, seq, id FROM inserted
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
    RETURNING h.id, h.user_id, h.parent_id, h.root_id, h.path, h.amount, h.remaining, h.captured, h.status,
              h.expires_at, h.description, h.metadata, h.created_at
),
to_parent AS (
    UPDATE holds h SET remaining = h.remaining + f.amount, updated_at = clock_timestamp()
    FROM freed f
    WHERE h.user_id = %(user_id)s AND h.id = f.parent_id
),
-- Written for a root's release (held goes down), or to number the event of a child's.
to_account AS (
    UPDATE accounts a
    SET held = a.held - CASE WHEN f.parent_id IS NULL THEN f.amount ELSE 0 END, updated_at = now(),
        {_return_trees("hf.root_id = %(root_id)s AND f.parent_id IS NULL")},
        {raising_set("a.balance - a.held + CASE WHEN f.parent_id IS NULL THEN f.amount ELSE 0 END", prefix="a.")}
    FROM freed f
    WHERE a.user_id = %(user_id)s AND (f.parent_id IS NULL OR %(events)s)
    RETURNING a.user_id, a.last_event_seq, a.last_event_txid, f.amount, f.parent_id
),
-- A root's release closed the whole tree: its allocation went back to the grants above.
emptied AS ({_empty_trees("hf.root_id = %(root_id)s AND %(hold_id)s = %(root_id)s", "to_account")}),
outbox AS (
    {EVENT_COLUMNS}
    SELECT t.user_id, t.last_event_seq, 'hold.released', {hold_data("h", ", 'released', t.amount")}, t.last_event_txid
    FROM to_account t JOIN closed h ON h.id = %(hold_id)s
    WHERE %(events)s
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
           %(idempotency_key)s, %(request_hash)s, %(posted_by)s, %(request_id)s
    FROM parent p CROSS JOIN new_hold n
    RETURNING {HOLD_RETURNING}
),
-- A child reserves nothing new (held is unchanged): the account row is written only to number its event.
numbered AS (
    UPDATE accounts a SET last_event_seq = a.last_event_seq + 1, {txid_set("a.")}
    FROM inserted i
    WHERE a.user_id = %(user_id)s AND %(events)s
    RETURNING a.user_id, a.last_event_seq, a.last_event_txid
),
outbox AS (
    {EVENT_COLUMNS}
    SELECT n.user_id, n.last_event_seq, 'hold.created', {hold_data("h")}, n.last_event_txid
    FROM numbered n CROSS JOIN inserted h
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


# Scraped by /metrics, not run per request. Expired holds not yet swept still reserve their tokens
# (accounts.held counts them), so they count here too.
ACTIVE_HOLDS: LiteralString = """
SELECT count(*), coalesce(sum(remaining), 0) FROM holds WHERE status = 'active'
"""


# For the dispatcher's sweeper: trees with an active hold whose lease ran out at least `delay` seconds ago
# (requests see expiry exactly without a sweep; the sweep is what makes hold.expired appear in bounded time).
DUE_TREES: LiteralString = """
SELECT DISTINCT user_id, root_id FROM holds
WHERE status = 'active' AND expires_at <= statement_timestamp() - make_interval(secs => %(delay)s)
LIMIT %(limit)s
"""
