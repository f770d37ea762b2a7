"""The allowances' SQL: their terms, the claim of each period, and the granter's look-ups.

A period is granted in three steps, each safe to repeat and to race (see migration 0007): CLAIM_PERIOD fixes
the period's amount under the primary key (first one wins), the credit goes through the ledger under the
Idempotency-Key `allowance:{id}:{period start}` (first one wins, the others replay it), and RECORD_GRANT
writes down the grant and moves `next_period_at` on.
"""

from typing import LiteralString

# The allowance as the API shows it, with its latest granted period (`p`, may be null).
_VIEW = """
    a.id, a.user_id, a.amount, a.period, a.timezone, a.anchor, a.rollover, a.rollover_cap, a.priority,
    a.category, a.description, a.created_at, a.stopped_at, a.next_period_at,
    p.period_start, p.period_end, p.amount, p.rolled_over, p.grant_id"""

_LATEST_PERIOD = """
LEFT JOIN LATERAL (
    SELECT period_start, period_end, amount, rolled_over, grant_id FROM allowance_periods
    WHERE user_id = a.user_id AND allowance_id = a.id
    ORDER BY period_start DESC LIMIT 1
) p ON true"""

# Keyed creations race like every keyed write: ON CONFLICT waits for the twin's commit and does nothing, and
# the caller reads the twin's row with ALLOWANCE_BY_KEY.
CREATE_ALLOWANCE: LiteralString = f"""
WITH created AS (
    INSERT INTO allowances AS a (user_id, amount, period, timezone, anchor, rollover, rollover_cap, priority,
                                 category, description, next_period_at, posted_by, idempotency_key, request_hash)
    VALUES (%(user_id)s, %(amount)s, %(period)s, %(timezone)s, %(anchor)s, %(rollover)s, %(rollover_cap)s,
            %(priority)s, %(category)s, %(description)s, %(next_period_at)s, %(posted_by)s, %(idempotency_key)s,
            %(request_hash)s)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING *
)
SELECT {_VIEW}, NULL::bytea AS request_hash
FROM created a LEFT JOIN allowance_periods p ON false
"""

ALLOWANCE_BY_KEY: LiteralString = f"""
SELECT {_VIEW}, a.request_hash
FROM allowances a {_LATEST_PERIOD}
WHERE a.user_id = %(user_id)s AND a.idempotency_key = %(idempotency_key)s
"""

ALLOWANCE: LiteralString = f"""
SELECT {_VIEW}
FROM allowances a {_LATEST_PERIOD}
WHERE a.id = %(allowance_id)s
"""

USER_ALLOWANCES: LiteralString = f"""
SELECT {_VIEW}
FROM allowances a {_LATEST_PERIOD}
WHERE a.user_id = %(user_id)s
ORDER BY a.created_at, a.id
"""

# Stops future periods; the current period's grant stays. Stopping a stopped allowance keeps its first time.
STOP_ALLOWANCE: LiteralString = """
UPDATE allowances SET stopped_at = coalesce(stopped_at, statement_timestamp())
WHERE id = %(allowance_id)s
RETURNING user_id
"""

_TERMS = "a.id, a.user_id, a.amount, a.period, a.timezone, a.anchor, a.rollover, a.priority, a.category, a.description"

# The granter's work list: active allowances whose next period has started, and the database's clock (the
# one CLAIM_PERIOD checks), so that the granter picks the period the database agrees has begun.
DUE_ALLOWANCES: LiteralString = f"""
SELECT {_TERMS}, statement_timestamp()
FROM allowances a
WHERE a.stopped_at IS NULL AND a.next_period_at <= statement_timestamp()
ORDER BY a.next_period_at
LIMIT %(limit)s
"""

# Claims whose credit never happened (a granter died between the two) and whose period is still running,
# stopped allowances included: the claim was made before the stop.
PENDING_CLAIMS: LiteralString = f"""
SELECT {_TERMS}, p.period_start
FROM allowance_periods p JOIN allowances a ON a.user_id = p.user_id AND a.id = p.allowance_id
WHERE p.grant_id IS NULL AND p.period_end > statement_timestamp()
ORDER BY p.claimed_at
LIMIT %(limit)s
"""

# The period's row, first writer wins (the primary key), with its amount fixed once: the allowance's amount,
# plus with rollover what the previous period's grant had left when it expired, up to the cap. That is what
# its expiry rows wrote off plus what its slot still holds unswept; tokens that holds had reserved were in no
# slot at the expiry, so they do not roll (unless released back before this claim). A voided grant rolls
# nothing (its write-offs are void rows). Nothing is claimed for a stopped allowance or a period that has not
# started by the database's clock.
CLAIM_PERIOD: LiteralString = """
INSERT INTO allowance_periods (user_id, allowance_id, period_start, period_end, amount, rolled_over)
SELECT a.user_id, a.id, %(period_start)s, %(period_end)s, a.amount + r.rolled, r.rolled
FROM allowances a
CROSS JOIN LATERAL (
    SELECT CASE WHEN NOT a.rollover THEN 0 ELSE least(a.rollover_cap, coalesce((
        SELECT (SELECT coalesce(sum(s.remaining), 0)
                FROM accounts ac CROSS JOIN unnest(ac.grants) AS s
                WHERE ac.user_id = p.user_id AND s.grant_id = p.grant_id AND g.voided_at IS NULL)
             + (SELECT coalesce(-sum(t.amount), 0)
                FROM transactions t
                WHERE t.user_id = p.user_id AND t.grant_id = p.grant_id AND t.type = 'expiry')
        FROM allowance_periods p JOIN grants g ON g.user_id = p.user_id AND g.id = p.grant_id
        WHERE p.user_id = a.user_id AND p.allowance_id = a.id AND p.period_start = %(previous_start)s
    ), 0)) END AS rolled
) r
WHERE a.user_id = %(user_id)s AND a.id = %(allowance_id)s AND a.stopped_at IS NULL
  AND %(period_start)s <= statement_timestamp()
ON CONFLICT DO NOTHING
"""

# The claim as it stands (ours or a twin's: a separate statement, so a twin's committed claim is visible).
PERIOD_CLAIM: LiteralString = """
SELECT period_end, amount, rolled_over, grant_id
FROM allowance_periods
WHERE user_id = %(user_id)s AND allowance_id = %(allowance_id)s AND period_start = %(period_start)s
"""

RECORD_GRANT: LiteralString = """
WITH recorded AS (
    UPDATE allowance_periods
    SET grant_id = %(grant_id)s, transaction_id = %(transaction_id)s
    WHERE user_id = %(user_id)s AND allowance_id = %(allowance_id)s AND period_start = %(period_start)s
      AND grant_id IS NULL
)
UPDATE allowances SET next_period_at = %(period_end)s
WHERE user_id = %(user_id)s AND id = %(allowance_id)s AND next_period_at < %(period_end)s
"""

# For `billing audit`: one row per problem. A period credited more than once (the promise this domain keeps),
# and a period whose recorded grant is not an allowance grant of the period's amount.
ALLOWANCE_AUDIT: LiteralString = """
SELECT t.user_id, (t.metadata ->> 'allowance_id')::uuid AS allowance_id,
       format('period %s credited %s times', t.metadata ->> 'period_start', count(*)) AS problem
FROM transactions t
WHERE t.type = 'credit' AND t.posted_by = 'system:allowance' AND t.metadata ? 'allowance_id'
GROUP BY t.user_id, t.metadata ->> 'allowance_id', t.metadata ->> 'period_start'
HAVING count(*) > 1
UNION ALL
SELECT p.user_id, p.allowance_id, format('period %s records grant %s, not an allowance grant of %s', p.period_start,
                                         p.grant_id, p.amount)
FROM allowance_periods p
WHERE p.grant_id IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM grants g
    WHERE g.user_id = p.user_id AND g.id = p.grant_id AND g.source = 'allowance' AND g.amount = p.amount)
ORDER BY 1, 2
"""
