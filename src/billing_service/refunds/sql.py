"""The refunds' SQL. A refund runs as one transaction: lock the account row (grants/sql.py LOCK_ACCOUNT),
read the charge and what was refunded of it so far (REFUND_CONTEXT, a fresh snapshot taken under the lock, so
two refunds of one charge can never both see the same room), then REFUND, which posts it.

Which grants get the tokens back is decided in rules.py from the charge's funding, last drawn first.
"""

from typing import LiteralString

from billing_service.events.sql import EVENT_COLUMNS, LEDGER_RETURNING, POSTED_DATA, raising_set
from billing_service.ledger.sql import LEDGER_ROW_COLUMNS

# The charge, what its refunds total so far, and the grants that funded it (are they still live?). The key's
# earlier refund, if this Idempotency-Key was already used on this account.
REFUND_CONTEXT: LiteralString = """
SELECT t.type, -t.amount AS charged, t.funding,
       (SELECT coalesce(sum(r.amount), 0)::bigint FROM transactions r
        WHERE r.user_id = t.user_id AND r.refund_of = t.id) AS refunded,
       (SELECT coalesce(jsonb_object_agg(g.id, jsonb_build_object(
                   'live', g.voided_at IS NULL AND coalesce(g.expires_at > statement_timestamp(), true),
                   'priority', g.priority, 'category', g.category)), '{}')
        FROM grants g
        WHERE g.user_id = t.user_id
          AND g.id IN (SELECT (f ->> 'grant_id')::uuid FROM jsonb_array_elements(t.funding) AS f)) AS grants
FROM transactions t
WHERE t.user_id = %(user_id)s AND t.id = %(transaction_id)s
"""

EXISTING_REFUND: LiteralString = """
SELECT id, amount, balance_after, request_hash, refund_of,
       (SELECT coalesce(sum(r.amount), 0)::bigint FROM transactions r
        WHERE r.user_id = t.user_id AND r.refund_of = t.refund_of) AS refunded
FROM transactions t
WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
"""

# Under the account lock, with the plan made from REFUND_CONTEXT: tokens back into the live grants that paid
# (`returned`, a funding list) and, for a grant that has expired or was voided since, a grant of its own with
# no expiry (`new_grants`: amount, priority, category). The ledger row's funding names both.
REFUND: LiteralString = f"""
WITH new_grant AS (
    SELECT billing_uuidv7() AS id, n.amount, n.priority, n.category, clock_timestamp() AS at
    FROM unnest(%(new_amounts)s::bigint[], %(new_priorities)s::smallint[], %(new_categories)s::text[])
         AS n(amount, priority, category)
),
refunded AS (
    UPDATE accounts a
    SET balance = a.balance + %(amount)s, last_seq = a.last_seq + 1, updated_at = now(), depleted_notified = false,
        (grants, next_expiry) = (
            SELECT x.slots, billing_next_expiry(x.slots)
            FROM (SELECT billing_slots_add(
                      (billing_return(a.grants, a.user_id, %(returned)s::jsonb)).new_slots,
                      (SELECT array_agg(ROW(n.id, n.amount, n.priority, NULL, n.at)::billing_grant_slot)
                       FROM new_grant n)) AS slots) x),
        {raising_set("a.balance + %(amount)s - a.held", "2", prefix="a.")}
    WHERE a.user_id = %(user_id)s
    RETURNING a.user_id, a.last_seq, a.balance, a.last_event_seq, a.last_event_txid
),
granted AS (
    INSERT INTO grants (user_id, id, amount, priority, category, source, created_at)
    SELECT r.user_id, n.id, n.amount, n.priority, n.category, 'refund', n.at
    FROM refunded r CROSS JOIN new_grant n
),
inserted AS (
    INSERT INTO transactions ({LEDGER_ROW_COLUMNS}, refund_of)
    SELECT r.user_id, r.last_seq, 'refund', %(amount)s, r.balance, %(description)s, %(metadata)s,
           %(idempotency_key)s, %(request_hash)s, %(posted_by)s, %(request_id)s,
           %(returned)s::jsonb || coalesce((SELECT jsonb_agg(jsonb_build_object('grant_id', n.id, 'amount', n.amount))
                                             FROM new_grant n), '[]'),
           %(transaction_id)s
    FROM refunded r
    RETURNING {LEDGER_RETURNING}
),
outbox AS (
    {EVENT_COLUMNS}
    SELECT r.user_id, r.last_event_seq - 1, 'transaction.posted', {POSTED_DATA}, r.last_event_txid
    FROM refunded r CROSS JOIN inserted i
    WHERE %(events)s
    UNION ALL
    SELECT r.user_id, r.last_event_seq, 'refund.posted',
           json_build_object('user_id', r.user_id, 'transaction_id', i.id, 'refund_of', i.refund_of,
                             'amount', i.amount, 'refunded_total', %(refunded_total)s::bigint,
                             'charged', %(charged)s::bigint, 'funding', i.funding, 'balance', r.balance),
           r.last_event_txid
    FROM refunded r CROSS JOIN inserted i
    WHERE %(events)s
)
SELECT id, balance_after FROM inserted
"""
