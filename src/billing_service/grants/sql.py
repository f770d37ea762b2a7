"""The grants' SQL: expiry sweeps, voids, listing and the audit. The draw-down itself lives in the debiting
statements (ledger/sql.py DRAW_SET, holds/sql.py), because it is part of their one UPDATE.

Statements here that change an account run in a transaction that first takes LOCK_ACCOUNT, so their own
snapshot (READ COMMITTED: a fresh one per statement) is taken while nobody else can change the account's
slots: what they read of `accounts.grants` is what they write back.
"""

from typing import LiteralString

from billing_service.events.sql import EVENT_COLUMNS, LEDGER_RETURNING, POSTED_DATA, lowering_set

LOCK_ACCOUNT: LiteralString = """
SELECT user_id FROM accounts WHERE user_id = %(user_id)s FOR UPDATE
"""

# Found by grant id alone (the void route names no user), locking the account row.
LOCK_GRANT_ACCOUNT: LiteralString = """
SELECT a.user_id
FROM grants g JOIN accounts a ON a.user_id = g.user_id
WHERE g.id = %(grant_id)s
FOR UPDATE OF a
"""

# The cheap look before a sweep: one primary-key probe, no transaction.
HAS_DUE_GRANTS: LiteralString = """
SELECT coalesce(next_expiry <= statement_timestamp(), false) FROM accounts WHERE user_id = %(user_id)s
"""

# For the dispatcher's sweeper: accounts with a grant that expired at least `delay` seconds ago (reads and
# writes see expiry exactly without a sweep; the sweep is what makes the expiry row and grant.expired appear).
DUE_ACCOUNTS: LiteralString = """
SELECT user_id FROM accounts
WHERE next_expiry <= statement_timestamp() - make_interval(secs => %(delay)s)
ORDER BY next_expiry
LIMIT %(limit)s
"""

# The slots of an account as rows, with their position in the draw order.
_SLOTS = """unnest(a.grants) WITH ORDINALITY AS s(grant_id, remaining, priority, expires_at, created_at, ord)"""
_SLOT = "ROW(s.grant_id, s.remaining, s.priority, s.expires_at, s.created_at)::billing_grant_slot"

# Under LOCK_ACCOUNT. Writes off every slot whose grant has expired (or was voided, for tokens that came back
# to it from a hold afterwards): one ledger row each (type expiry, or void), oldest expiry first, each with
# its transaction.posted and grant.expired; balance.low if the loss crossed the threshold.
SWEEP_GRANTS: LiteralString = f"""
WITH due AS (
    SELECT s.grant_id, s.remaining, s.expires_at, g.voided_at IS NOT NULL AS voided,
           row_number() OVER w AS n, sum(s.remaining) OVER w AS through
    FROM accounts a CROSS JOIN {_SLOTS}
    JOIN grants g ON g.user_id = a.user_id AND g.id = s.grant_id
    WHERE a.user_id = %(user_id)s AND s.expires_at <= statement_timestamp() AND s.remaining > 0
    WINDOW w AS (ORDER BY s.expires_at, s.ord)
),
total AS (SELECT count(*) AS rows, sum(remaining) AS amount FROM due),
swept AS (
    UPDATE accounts a
    SET balance = a.balance - t.amount, last_seq = a.last_seq + t.rows, updated_at = now(),
        grants = (SELECT coalesce(array_agg({_SLOT} ORDER BY s.ord), '{{}}') FROM {_SLOTS}
                  WHERE s.remaining > 0 AND NOT coalesce(s.expires_at <= statement_timestamp(), false)),
        next_expiry = (SELECT min(s.expires_at) FROM {_SLOTS}
                       WHERE s.remaining > 0 AND s.expires_at > statement_timestamp()),
        {lowering_set("a.balance - a.held - t.amount", "2 * t.rows", "a.")}
    FROM total t
    WHERE a.user_id = %(user_id)s AND t.rows > 0
    RETURNING a.user_id, a.last_seq, a.balance, a.last_event_seq, a.last_event_txid, t.rows, t.amount,
              (%(events)s AND coalesce(a.low_balance_event_seq = a.last_event_seq, false)) AS crossed
),
inserted AS (
    INSERT INTO transactions (user_id, seq, type, amount, balance_after, description, funding, grant_id, posted_by)
    SELECT w.user_id, w.last_seq - w.rows + d.n, CASE WHEN d.voided THEN 'void' ELSE 'expiry' END, -d.remaining,
           w.balance + w.amount - d.through,
           CASE WHEN d.voided THEN 'Grant voided' ELSE 'Grant expired' END,
           jsonb_build_array(jsonb_build_object('grant_id', d.grant_id, 'amount', d.remaining)), d.grant_id,
           'system:expiry'
    FROM swept w CROSS JOIN due d
    RETURNING {LEDGER_RETURNING}, seq
),
outbox AS (
    {EVENT_COLUMNS}
    SELECT w.user_id, w.last_event_seq - w.crossed::int - 2 * w.rows + 2 * d.n - 1, 'transaction.posted',
           {POSTED_DATA}, w.last_event_txid
    FROM swept w CROSS JOIN due d JOIN inserted i ON i.seq = w.last_seq - w.rows + d.n
    WHERE %(events)s
    UNION ALL
    SELECT w.user_id, w.last_event_seq - w.crossed::int - 2 * w.rows + 2 * d.n, 'grant.expired',
           json_build_object('user_id', w.user_id, 'grant_id', d.grant_id, 'expired', d.remaining,
                             'expires_at', d.expires_at, 'voided', d.voided, 'transaction_id', i.id),
           w.last_event_txid
    FROM swept w CROSS JOIN due d JOIN inserted i ON i.seq = w.last_seq - w.rows + d.n
    WHERE %(events)s
    UNION ALL
    SELECT w.user_id, w.last_event_seq, 'balance.low',
           json_build_object('user_id', a.user_id, 'threshold', a.low_balance_threshold,
                             'available', a.balance - a.held, 'balance', a.balance, 'held', a.held),
           w.last_event_txid
    FROM swept w JOIN accounts a ON a.user_id = w.user_id
    WHERE w.crossed
)
SELECT coalesce(sum(remaining), 0) FROM due
"""

# Under LOCK_GRANT_ACCOUNT. Voids a grant: its unspent tokens leave the balance with a void row now; tokens
# of it that holds reserved come back later to a voided grant, and the next sweep writes them off too.
# Idempotent: voiding a voided grant changes nothing and answers the same.
VOID_GRANT: LiteralString = f"""
WITH target AS (
    SELECT g.user_id, g.id, g.voided_at FROM grants g WHERE g.id = %(grant_id)s
),
slot AS (
    SELECT s.remaining
    FROM target t JOIN accounts a ON a.user_id = t.user_id CROSS JOIN {_SLOTS}
    WHERE s.grant_id = t.id AND s.remaining > 0
),
voided AS (
    UPDATE grants g SET voided_at = statement_timestamp()
    FROM target t
    WHERE g.user_id = t.user_id AND g.id = t.id AND t.voided_at IS NULL
    RETURNING g.user_id, g.id
),
written_off AS (
    UPDATE accounts a
    SET balance = a.balance - s.remaining, last_seq = a.last_seq + 1, updated_at = now(),
        grants = (SELECT coalesce(array_agg({_SLOT} ORDER BY s.ord), '{{}}') FROM {_SLOTS}
                  WHERE s.grant_id <> v.id),
        next_expiry = (SELECT min(s.expires_at) FROM {_SLOTS} WHERE s.grant_id <> v.id AND s.remaining > 0),
        {lowering_set("a.balance - a.held - s.remaining", prefix="a.")}
    FROM voided v CROSS JOIN slot s
    WHERE a.user_id = v.user_id
    RETURNING a.user_id, a.last_seq, a.balance, a.last_event_seq, a.last_event_txid, s.remaining
),
inserted AS (
    INSERT INTO transactions (user_id, seq, type, amount, balance_after, description, funding, grant_id,
                              posted_by, request_id)
    SELECT w.user_id, w.last_seq, 'void', -w.remaining, w.balance, %(description)s,
           jsonb_build_array(jsonb_build_object('grant_id', %(grant_id)s::uuid, 'amount', w.remaining)),
           %(grant_id)s, %(posted_by)s, %(request_id)s
    FROM written_off w
    RETURNING {LEDGER_RETURNING}
),
outbox AS (
    {EVENT_COLUMNS}
    SELECT w.user_id, w.last_event_seq, 'transaction.posted', {POSTED_DATA}, w.last_event_txid
    FROM written_off w CROSS JOIN inserted i
    WHERE %(events)s
)
SELECT CASE WHEN t.id IS NULL THEN 'grant_not_found'
            WHEN t.voided_at IS NOT NULL THEN 'replayed'
            ELSE 'applied' END AS outcome,
       (SELECT id FROM inserted) AS transaction_id,
       coalesce((SELECT remaining FROM slot), 0) AS voided
FROM (VALUES (1)) AS one
LEFT JOIN target t ON true
"""

# One grant as the API shows it: what is left to draw (0 once expired or voided), what hold trees still
# reserve of it, and its terms.
_GRANT_VIEW = """
    g.id, g.user_id, g.amount,
    CASE WHEN g.voided_at IS NOT NULL OR g.expires_at <= statement_timestamp() THEN 0
         ELSE coalesce(s.remaining, 0) END AS remaining,
    coalesce((SELECT sum(f.amount) FROM hold_funding f
              WHERE f.user_id = g.user_id AND f.grant_id = g.id), 0)::bigint AS reserved,
    g.priority, g.category, g.expires_at, g.created_at, g.source, g.voided_at"""

# The live grants: those with tokens left to draw or reserved by holds, in draw order. Driven by the account's
# slots and its hold trees' allocations, never by the whole (ever-growing) grants table.
LIVE_GRANTS: LiteralString = f"""
WITH ids AS (
    SELECT s.grant_id FROM accounts a CROSS JOIN {_SLOTS} WHERE a.user_id = %(user_id)s
    UNION
    SELECT grant_id FROM hold_funding WHERE user_id = %(user_id)s AND amount > 0
)
SELECT {_GRANT_VIEW}
FROM ids
JOIN grants g ON g.user_id = %(user_id)s AND g.id = ids.grant_id
LEFT JOIN LATERAL (
    SELECT s.remaining FROM accounts a CROSS JOIN {_SLOTS} WHERE a.user_id = g.user_id AND s.grant_id = g.id
) s ON true
WHERE g.voided_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > statement_timestamp())
ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
"""

GRANT: LiteralString = f"""
SELECT {_GRANT_VIEW}
FROM grants g
LEFT JOIN LATERAL (
    SELECT s.remaining FROM accounts a CROSS JOIN {_SLOTS} WHERE a.user_id = g.user_id AND s.grant_id = g.id
) s ON true
WHERE g.id = %(grant_id)s
"""

# Grant accounting, for `billing audit`: one row per problem, in one snapshot. Run without parameters.
# - per account: the slots hold exactly balance - held, and the hold trees' allocations exactly held;
# - per grant: slot remaining + reserved = what the ledger rows moved into it minus what they took out
#   (a credit's row puts its amount in; debits, captures, expiries and voids take out; refunds put back);
# - per grant but the opening one: the first credit or refund row that names it brought exactly its amount (the
#   checks above cannot see a grant whose amount says more than ever came in: it only looks partly spent).
GRANT_AUDIT: LiteralString = """
WITH slots AS (
    SELECT a.user_id, s.grant_id, s.remaining
    FROM accounts a CROSS JOIN unnest(a.grants) AS s
),
reserved AS (
    SELECT user_id, grant_id, sum(amount) AS amount FROM hold_funding GROUP BY user_id, grant_id
),
moved AS (
    SELECT t.user_id, (f ->> 'grant_id')::uuid AS grant_id, sum(sign(t.amount) * (f ->> 'amount')::bigint) AS amount
    FROM transactions t CROSS JOIN jsonb_array_elements(t.funding) AS f
    WHERE t.funding IS NOT NULL
    GROUP BY 1, 2
),
founded AS (
    SELECT DISTINCT ON (t.user_id, (f ->> 'grant_id')::uuid)
           t.user_id, (f ->> 'grant_id')::uuid AS grant_id, t.type, (f ->> 'amount')::bigint AS amount
    FROM transactions t CROSS JOIN jsonb_array_elements(t.funding) AS f
    WHERE t.funding IS NOT NULL AND t.type IN ('credit', 'refund')
    ORDER BY t.user_id, (f ->> 'grant_id')::uuid, t.seq
),
per_grant AS (
    SELECT g.user_id, g.id, g.amount, g.source, coalesce(s.remaining, 0) AS remaining,
           coalesce(r.amount, 0) AS reserved, coalesce(m.amount, 0) AS moved,
           fo.type AS founded_by, fo.amount AS founded_with
    FROM grants g
    LEFT JOIN (SELECT user_id, grant_id, sum(remaining) AS remaining FROM slots GROUP BY 1, 2) s
        ON s.user_id = g.user_id AND s.grant_id = g.id
    LEFT JOIN reserved r ON r.user_id = g.user_id AND r.grant_id = g.id
    LEFT JOIN moved m ON m.user_id = g.user_id AND m.grant_id = g.id
    LEFT JOIN founded fo ON fo.user_id = g.user_id AND fo.grant_id = g.id
)
SELECT a.user_id, NULL::uuid AS grant_id,
       format('grants hold %s but balance - held is %s', coalesce(s.total, 0), a.balance - a.held) AS problem
FROM accounts a
LEFT JOIN (SELECT user_id, sum(remaining) AS total FROM slots GROUP BY user_id) s USING (user_id)
WHERE coalesce(s.total, 0) <> a.balance - a.held
UNION ALL
SELECT a.user_id, NULL::uuid, format('holds reserve %s of grants but held is %s', coalesce(r.total, 0), a.held)
FROM accounts a
LEFT JOIN (SELECT user_id, sum(amount) AS total FROM hold_funding GROUP BY user_id) r USING (user_id)
WHERE coalesce(r.total, 0) <> a.held
UNION ALL
SELECT user_id, id, format('remaining %s + reserved %s but its ledger rows moved %s', remaining, reserved,
                           moved + CASE WHEN source = 'opening' THEN amount ELSE 0 END)
FROM per_grant
WHERE remaining + reserved <> moved + CASE WHEN source = 'opening' THEN amount ELSE 0 END
UNION ALL
SELECT user_id, id, format('remaining %s + reserved %s is more than its amount %s', remaining, reserved, amount)
FROM per_grant
WHERE remaining + reserved > amount
UNION ALL
SELECT user_id, id, CASE WHEN founded_by IS NULL THEN format('no credit or refund row brought its amount %s', amount)
                         ELSE format('its %s row brought %s but its amount is %s', founded_by, founded_with, amount)
                    END
FROM per_grant
WHERE source <> 'opening' AND founded_with IS DISTINCT FROM amount
ORDER BY 1, 2 NULLS FIRST
"""
