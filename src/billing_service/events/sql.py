"""The outbox's SQL fragments, which the ledger's and the holds' statements compose into their own.

Every statement that changes an account writes its events in the same statement (so they commit or roll
back together), numbered from `accounts.last_event_seq`, which the statement bumps in the UPDATE that already
holds the account row lock. Nothing here runs on its own; see ledger/sql.py and holds/sql.py.

Low balance, in the same UPDATE: a statement that lowers available fires `balance.low` when the account is
armed and the new available is below its threshold (and disarms it); any statement that leaves available at
or above the threshold re-arms it. The UPDATE records the crossing's event seq in low_balance_event_seq, so
its RETURNING (which sees only new values) can tell that it fired: low_balance_event_seq = last_event_seq.

Every events INSERT and seq bump is gated by the boolean parameter `%(events)s` (BILLING_EVENTS).
"""

from typing import LiteralString


def _crossing(new_available: LiteralString, prefix: LiteralString, decreasing: LiteralString) -> LiteralString:
    return (
        f"coalesce(%(events)s AND {prefix}low_balance_armed AND {decreasing} "
        f"AND {new_available} < {prefix}low_balance_threshold, false)"
    )


def txid_set(prefix: LiteralString = "") -> LiteralString:
    """The txid an account's events are stamped with: this transaction's, or the account's previous one's if
    that is larger (a transaction can get its xid before it waits for the row lock, so xids alone need not
    follow seq). Never below the writer's own xid, so the feed stays commit-safe (see _FEED_ROW)."""
    return (
        f"last_event_txid = CASE WHEN %(events)s THEN greatest({prefix}last_event_txid, pg_current_xact_id()) "
        f"ELSE {prefix}last_event_txid END"
    )


def lowering_set(
    new_available: LiteralString,
    count: LiteralString = "1",
    prefix: LiteralString = "",
    decreasing: LiteralString = "true",
) -> LiteralString:
    """SET clauses for an UPDATE of accounts that may lower available to `new_available` (an expression in the
    row's old values) and emits `count` events of its own, plus balance.low when it crosses the threshold."""
    crossing = _crossing(new_available, prefix, decreasing)
    return f"""last_event_seq = {prefix}last_event_seq
            + CASE WHEN %(events)s THEN {count} + ({crossing})::int ELSE 0 END,
        {txid_set(prefix)},
        low_balance_armed = CASE WHEN {crossing} THEN false
                                 WHEN {new_available} >= {prefix}low_balance_threshold THEN true
                                 ELSE {prefix}low_balance_armed END,
        low_balance_event_seq = CASE WHEN {crossing} THEN {prefix}last_event_seq + {count} + 1
                                     ELSE {prefix}low_balance_event_seq END"""


def raising_set(new_available: LiteralString, count: LiteralString = "1", prefix: LiteralString = "") -> LiteralString:
    """SET clauses for an UPDATE of accounts that never lowers available: bumps the seq by `count` events and
    re-arms the alert when available is back at or above the threshold."""
    return f"""last_event_seq = {prefix}last_event_seq + CASE WHEN %(events)s THEN {count} ELSE 0 END,
        {txid_set(prefix)},
        low_balance_armed = {prefix}low_balance_armed
            OR coalesce({new_available} >= {prefix}low_balance_threshold, false)"""


# In a RETURNING of an UPDATE that used lowering_set: did this statement fire balance.low?
CROSSED: LiteralString = "(%(events)s AND coalesce(low_balance_event_seq = last_event_seq, false)) AS crossed"
ACCOUNT_RETURNING: LiteralString = f"balance, held, low_balance_threshold, last_event_seq, last_event_txid, {CROSSED}"

EVENT_COLUMNS: LiteralString = "INSERT INTO events (user_id, seq, type, data, txid)"

# A ledger row exactly as history renders it (ledger/sql.py _HISTORY_ROW), from an INSERT ... RETURNING
# LEDGER_RETURNING aliased `i`.
LEDGER_RETURNING: LiteralString = (
    "id, user_id, amount, description, created_at, type, balance_after, metadata, hold_id, funding, grant_id, refund_of"
)
POSTED_DATA: LiteralString = """json_build_object(
    'id', i.id, 'user_id', i.user_id, 'amount', i.amount, 'description', i.description,
    'created_at', i.created_at, 'type', i.type, 'balance_after', i.balance_after, 'metadata', i.metadata,
    'hold_id', i.hold_id, 'funding', i.funding, 'grant_id', i.grant_id, 'refund_of', i.refund_of)"""


def low_data(alias: LiteralString) -> LiteralString:
    """balance.low's data, from the RETURNING (ACCOUNT_RETURNING) of the account UPDATE aliased `alias`."""
    return f"""json_build_object(
    'user_id', {alias}.user_id, 'threshold', {alias}.low_balance_threshold,
    'available', {alias}.balance - {alias}.held, 'balance', {alias}.balance, 'held', {alias}.held)"""


def low_event(alias: LiteralString) -> LiteralString:
    """The SELECT of a balance.low row, for a UNION ALL in an events INSERT."""
    return f"""SELECT {alias}.user_id, {alias}.last_event_seq, 'balance.low', {low_data(alias)}, {alias}.last_event_txid
    FROM {alias} WHERE {alias}.crossed"""


# A hold row (every column, from an UPDATE/INSERT ... RETURNING h.* aliased `h`) as the API shows it.
HOLD_RETURNING: LiteralString = (
    "id, user_id, parent_id, root_id, path, amount, remaining, captured, status, expires_at, description, "
    "metadata, created_at"
)


def hold_data(alias: LiteralString, extra: LiteralString = "") -> LiteralString:
    return f"""json_build_object(
    'hold_id', {alias}.id, 'user_id', {alias}.user_id, 'parent_id', {alias}.parent_id, 'root_id', {alias}.root_id,
    'depth', cardinality({alias}.path), 'amount', {alias}.amount, 'remaining', {alias}.remaining,
    'captured', {alias}.captured, 'status', {alias}.status, 'expires_at', {alias}.expires_at,
    'description', {alias}.description, 'metadata', {alias}.metadata, 'created_at', {alias}.created_at{extra})"""


# Run on the (rare) refusal path only, never inside the charge statement: flips depleted_notified
# false -> true and writes balance.depleted only when it flipped, so it fires once until the next credit
# (CREDIT resets the flag in its own UPDATE).
DEPLETED: LiteralString = """
WITH flipped AS (
    UPDATE accounts
    SET depleted_notified = true, last_event_seq = last_event_seq + 1, updated_at = now(),
        last_event_txid = greatest(last_event_txid, pg_current_xact_id())
    WHERE user_id = %(user_id)s AND NOT depleted_notified AND %(events)s
    RETURNING user_id, last_event_seq, balance, held, last_event_txid
)
INSERT INTO events (user_id, seq, type, data, txid)
SELECT user_id, last_event_seq, 'balance.depleted', json_build_object(
    'user_id', user_id, 'operation', %(operation)s::text, 'requested', %(amount)s::bigint,
    'available', balance - held, 'balance', balance, 'held', held), last_event_txid
FROM flipped
"""


# ---------------------------------------------------------------------------------------------------------
# The feed. A bigserial (or a UUIDv7) is assigned at insert, not at commit: a tailing reader could pass an
# event whose transaction commits late. So each event carries its transaction's id (txid) and the feed only
# serves events whose transaction is older than every transaction still running (the snapshot's xmin):
# those have all committed or aborted, so no event can ever appear behind a cursor in (txid, user_id, seq).

_FEED_ROW: LiteralString = """
SELECT txid::text, user_id, seq, json_build_object(
    'id', id, 'type', type, 'user_id', user_id, 'seq', seq, 'created_at', created_at, 'data', data)::text
FROM events
WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
  AND (txid, user_id, seq) > (%(after_txid)s::text::xid8, %(after_user_id)s::uuid, %(after_seq)s::bigint)
"""

FEED_FILTERS: dict[str, LiteralString] = {
    "user_id": " AND user_id = %(user_id)s",
    "type": " AND type = %(type)s",
}


def feed(filters: list[str]) -> LiteralString:
    where: LiteralString = "".join(FEED_FILTERS[name] for name in sorted(filters))
    return _FEED_ROW + where + "\nORDER BY txid, user_id, seq\nLIMIT %(limit)s"


# ---------------------------------------------------------------------------------------------------------
# Webhooks.

_WEBHOOK_VIEW: LiteralString = "id, url, events, description, created_at, updated_at, previous_secret_expires_at"

WEBHOOK_CREATE: LiteralString = f"""
INSERT INTO webhooks (url, events, description, secret)
VALUES (%(url)s, %(events)s, %(description)s, %(secret)s)
RETURNING {_WEBHOOK_VIEW}, secret
"""

WEBHOOK: LiteralString = f"SELECT {_WEBHOOK_VIEW}, NULL::text FROM webhooks WHERE id = %(webhook_id)s"

WEBHOOKS: LiteralString = f"SELECT {_WEBHOOK_VIEW}, NULL::text FROM webhooks ORDER BY id"

WEBHOOK_DELETE: LiteralString = "DELETE FROM webhooks WHERE id = %(webhook_id)s RETURNING id"

# The old secret keeps signing (next to the new one) for the grace period, so receivers can switch over.
WEBHOOK_ROTATE: LiteralString = f"""
UPDATE webhooks
SET previous_secret = secret, previous_secret_expires_at = now() + make_interval(secs => %(grace_seconds)s),
    secret = %(secret)s, updated_at = now()
WHERE id = %(webhook_id)s
RETURNING {_WEBHOOK_VIEW}, secret
"""

# Replays make each chosen event's delivery pending again, with a fresh retry schedule (schedule_start).
_REPLAY: LiteralString = """
WITH hook AS (SELECT id, events FROM webhooks WHERE id = %(webhook_id)s),
chosen AS (
    SELECT e.user_id, e.seq, e.id, e.type
    FROM events e CROSS JOIN hook h
    WHERE (e.type = ANY(h.events) OR '*' = ANY(h.events)) AND {condition}
),
upserted AS (
    INSERT INTO deliveries (user_id, webhook_id, event_seq, event_id, event_type)
    SELECT c.user_id, %(webhook_id)s, c.seq, c.id, c.type FROM chosen c
    ON CONFLICT (user_id, webhook_id, event_seq) DO UPDATE
    SET status = 'pending', schedule_start = deliveries.attempts, next_attempt_at = now(), updated_at = now()
    RETURNING 1
)
SELECT count(*) FROM upserted
"""
# UUIDv7 ids rise with time: the id range narrows the scan to the events_id index; created_at makes it exact.
REPLAY_RANGE: LiteralString = _REPLAY.replace(
    "{condition}",
    "e.id >= %(id_low)s AND e.id < %(id_high)s AND e.created_at >= %(since)s AND e.created_at < %(until)s",
)
REPLAY_IDS: LiteralString = _REPLAY.replace("{condition}", "e.id = ANY(%(event_ids)s::uuid[])")

WAKE_DISPATCHER: LiteralString = "SELECT pg_notify('billing_dispatcher', 'wake')"

# The delivery log, newest first: each delivery with its attempts.
DELIVERIES: LiteralString = """
SELECT d.id, json_build_object(
    'id', d.id, 'event_id', d.event_id, 'event_type', d.event_type, 'user_id', d.user_id,
    'event_seq', d.event_seq, 'status', d.status, 'attempts', d.attempts,
    'next_attempt_at', CASE WHEN d.status = 'pending' THEN d.next_attempt_at END,
    'last_status_code', d.last_status_code, 'last_error', d.last_error, 'last_latency_ms', d.last_latency_ms,
    'created_at', d.created_at, 'updated_at', d.updated_at,
    'attempt_log', (
        SELECT coalesce(json_agg(json_build_object(
            'attempt', a.attempt, 'at', a.attempted_at, 'status_code', a.status_code, 'error', a.error,
            'latency_ms', a.latency_ms) ORDER BY a.attempt), '[]'::json)
        FROM delivery_attempts a
        WHERE a.user_id = d.user_id AND a.webhook_id = d.webhook_id AND a.event_seq = d.event_seq
    ))::text
FROM deliveries d
WHERE d.webhook_id = %(webhook_id)s AND d.id < %(before_id)s AND (%(status)s::text IS NULL OR d.status = %(status)s)
ORDER BY d.id DESC
LIMIT %(limit)s
"""

# ---------------------------------------------------------------------------------------------------------
# The dispatcher. One process at a time holds this session-level advisory lock on its own connection.
DISPATCHER_LOCK: LiteralString = "SELECT pg_try_advisory_lock(1651076204, 1)"
LISTEN: LiteralString = "LISTEN billing_dispatcher"

# Moves the dispatcher's position along the commit-safe feed and creates the deliveries of what it passed,
# in one statement: a crash leaves either both or neither. The position enters the row comparison as three
# scalars, so it bounds the events_feed index scan: joined to the position instead, the comparison was a join
# filter and every poll walked the index from the oldest retained event (20,000 events: 8,405 buffers, 16 ms).
FANOUT: LiteralString = """
WITH position AS (SELECT txid, user_id, seq FROM dispatcher_state WHERE id = 1 FOR UPDATE),
batch AS (
    SELECT e.txid, e.user_id, e.seq, e.id, e.type
    FROM events e
    WHERE e.txid < pg_snapshot_xmin(pg_current_snapshot())
      AND (e.txid, e.user_id, e.seq)
          > ((SELECT txid FROM position), (SELECT user_id FROM position), (SELECT seq FROM position))
    ORDER BY e.txid, e.user_id, e.seq
    LIMIT %(limit)s
),
fanned AS (
    INSERT INTO deliveries (user_id, webhook_id, event_seq, event_id, event_type)
    SELECT b.user_id, w.id, b.seq, b.id, b.type
    FROM batch b JOIN webhooks w ON b.type = ANY(w.events) OR '*' = ANY(w.events)
    ON CONFLICT DO NOTHING
    RETURNING 1
),
last AS (SELECT txid, user_id, seq FROM batch ORDER BY txid DESC, user_id DESC, seq DESC LIMIT 1),
moved AS (
    UPDATE dispatcher_state s SET txid = l.txid, user_id = l.user_id, seq = l.seq FROM last l WHERE s.id = 1
)
SELECT (SELECT count(*) FROM batch), (SELECT count(*) FROM fanned)
"""

# The head of each (account, webhook) queue that is due and not in flight: an account's next event never
# goes to a webhook before its previous one was delivered or finally failed.
DUE_DELIVERIES: LiteralString = """
SELECT d.user_id, d.webhook_id, d.event_seq, d.attempts - d.schedule_start, w.url, w.secret,
       CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END,
       e.id::text, json_build_object('type', e.type, 'timestamp', e.created_at, 'data', e.data)::text
FROM deliveries d
JOIN webhooks w ON w.id = d.webhook_id
JOIN events e ON e.user_id = d.user_id AND e.seq = d.event_seq
WHERE d.status = 'pending' AND d.next_attempt_at <= now()
  AND NOT EXISTS (
      SELECT 1 FROM deliveries p
      WHERE p.user_id = d.user_id AND p.webhook_id = d.webhook_id AND p.status = 'pending' AND p.event_seq < d.event_seq
  )
  AND (d.user_id, d.webhook_id) NOT IN (SELECT * FROM unnest(%(busy_users)s::uuid[], %(busy_webhooks)s::uuid[]))
ORDER BY d.next_attempt_at
LIMIT %(limit)s
"""

RECORD_ATTEMPT: LiteralString = """
WITH updated AS (
    UPDATE deliveries
    SET attempts = attempts + 1, status = %(status)s,
        next_attempt_at = now() + make_interval(secs => %(delay)s),
        last_status_code = %(status_code)s, last_error = %(error)s, last_latency_ms = %(latency_ms)s,
        updated_at = now()
    WHERE user_id = %(user_id)s AND webhook_id = %(webhook_id)s AND event_seq = %(event_seq)s AND status = 'pending'
    RETURNING user_id, webhook_id, event_seq, attempts
)
INSERT INTO delivery_attempts (user_id, webhook_id, event_seq, attempt, status_code, error, latency_ms)
SELECT user_id, webhook_id, event_seq, attempts, %(status_code)s, %(error)s, %(latency_ms)s FROM updated
"""

# Retention: events the dispatcher has passed, older than the retention, with no delivery still pending;
# and finished deliveries (with their attempts) as old.
PRUNE: LiteralString = """
WITH position AS (SELECT txid FROM dispatcher_state WHERE id = 1),
pruned_events AS (
    DELETE FROM events e USING position p
    WHERE e.created_at < now() - %(days)s * interval '1 day' AND e.txid <= p.txid
      AND NOT EXISTS (
          SELECT 1 FROM deliveries d WHERE d.user_id = e.user_id AND d.event_seq = e.seq AND d.status = 'pending'
      )
    RETURNING 1
),
pruned_deliveries AS (
    DELETE FROM deliveries
    WHERE status <> 'pending' AND updated_at < now() - %(days)s * interval '1 day'
    RETURNING 1
)
SELECT (SELECT count(*) FROM pruned_events), (SELECT count(*) FROM pruned_deliveries)
"""


# An account's newest events first, straight from the primary key (user_id, seq): the console's "recent events".
# Unlike the feed it shows events of transactions still committing too; it is a view, not a cursor to tail.
RECENT: LiteralString = """
SELECT json_build_object(
    'id', id, 'type', type, 'user_id', user_id, 'seq', seq, 'created_at', created_at, 'data', data)::text
FROM events
WHERE user_id = %(user_id)s
ORDER BY seq DESC
LIMIT %(limit)s
"""
