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
        low_balance_armed = CASE WHEN {crossing} THEN false
                                 WHEN {new_available} >= {prefix}low_balance_threshold THEN true
                                 ELSE {prefix}low_balance_armed END,
        low_balance_event_seq = CASE WHEN {crossing} THEN {prefix}last_event_seq + {count} + 1
                                     ELSE {prefix}low_balance_event_seq END"""


def raising_set(new_available: LiteralString, count: LiteralString = "1", prefix: LiteralString = "") -> LiteralString:
    """SET clauses for an UPDATE of accounts that never lowers available: bumps the seq by `count` events and
    re-arms the alert when available is back at or above the threshold."""
    return f"""last_event_seq = {prefix}last_event_seq + CASE WHEN %(events)s THEN {count} ELSE 0 END,
        low_balance_armed = {prefix}low_balance_armed
            OR coalesce({new_available} >= {prefix}low_balance_threshold, false)"""


# In a RETURNING of an UPDATE that used lowering_set: did this statement fire balance.low?
CROSSED: LiteralString = "(%(events)s AND coalesce(low_balance_event_seq = last_event_seq, false)) AS crossed"
ACCOUNT_RETURNING: LiteralString = f"balance, held, low_balance_threshold, last_event_seq, {CROSSED}"

EVENT_COLUMNS: LiteralString = "INSERT INTO events (user_id, seq, type, data)"

# A ledger row exactly as history renders it (ledger/sql.py _HISTORY_ROW), from an INSERT ... RETURNING
# LEDGER_RETURNING aliased `i`.
LEDGER_RETURNING: LiteralString = "id, user_id, amount, description, created_at, type, balance_after, metadata, hold_id"
POSTED_DATA: LiteralString = """json_build_object(
    'id', i.id, 'user_id', i.user_id, 'amount', i.amount, 'description', i.description,
    'created_at', i.created_at, 'type', i.type, 'balance_after', i.balance_after, 'metadata', i.metadata,
    'hold_id', i.hold_id)"""


def low_data(alias: LiteralString) -> LiteralString:
    """balance.low's data, from the RETURNING (ACCOUNT_RETURNING) of the account UPDATE aliased `alias`."""
    return f"""json_build_object(
    'user_id', {alias}.user_id, 'threshold', {alias}.low_balance_threshold,
    'available', {alias}.balance - {alias}.held, 'balance', {alias}.balance, 'held', {alias}.held)"""


def low_event(alias: LiteralString) -> LiteralString:
    """The SELECT of a balance.low row, for a UNION ALL in an events INSERT."""
    return f"""SELECT {alias}.user_id, {alias}.last_event_seq, 'balance.low', {low_data(alias)}
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
    SET depleted_notified = true, last_event_seq = last_event_seq + 1, updated_at = now()
    WHERE user_id = %(user_id)s AND NOT depleted_notified AND %(events)s
    RETURNING user_id, last_event_seq, balance, held
)
INSERT INTO events (user_id, seq, type, data)
SELECT user_id, last_event_seq, 'balance.depleted', json_build_object(
    'user_id', user_id, 'operation', %(operation)s, 'requested', %(amount)s,
    'available', balance - held, 'balance', balance, 'held', held)
FROM flipped
"""
