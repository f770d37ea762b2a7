"""The ledger's SQL: every statement on accounts and transactions. Nothing outside a domain's sql module writes SQL.

Each write is ONE statement, and so one round trip and one transaction (the pool runs in autocommit):
the conditional UPDATE of the account feeds the INSERT of its ledger row through a CTE, so the debit and
its row commit together or not at all, and no balance is ever read and then written.
"""

from collections.abc import Iterable
from typing import LiteralString

from billing_service.events.sql import (
    ACCOUNT_RETURNING,
    EVENT_COLUMNS,
    LEDGER_RETURNING,
    POSTED_DATA,
    low_event,
    lowering_set,
    raising_set,
)

# The idempotency key, if any, already used by this user. Compared with the request's hash in Python.
EXISTING_TRANSACTION = """
    existing AS (
        SELECT id, balance_after, request_hash, grant_id
        FROM transactions
        WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
    )"""

# posted_by / request_id: who wrote the row (a token's name, `cli:<user>`) and the request's X-Request-ID.
LEDGER_ROW_COLUMNS = (
    "user_id, seq, type, amount, balance_after, description, metadata, idempotency_key, request_hash, "
    "posted_by, request_id, funding"
)

# A debit's draw-down, in the SET of the UPDATE that holds the account row (migration 0006): the slots of the
# locked row, drawn in order; last_draw carries the funding to the ledger row, updated_at the decision's instant.
DRAW_SET: LiteralString = """(grants, last_draw, next_expiry, updated_at) = (
            SELECT d.new_slots, d.funding, d.next_expiry, d.drawn_at FROM billing_draw(grants, %(amount)s) d)"""

# billing_draw's SQLSTATE: a grant expired in the microseconds between the guard and the draw; decide again.
DRAW_RACED_EXPIRY = "BG001"

# No grant of the account is due to expire: then every slot is live and `balance - held` is exactly what the
# live grants hold, so the one-row guard stays exact. When one is due, the write is refused and the refusal
# path sweeps (writes the expiry rows first) and retries, so a debit never spends an expired token.
NOTHING_DUE: LiteralString = "coalesce(next_expiry > clock_timestamp(), true)"

# Debit: the WHERE clause is the whole overdraft guard. Under READ COMMITTED a concurrent debit of the same
# row makes this one wait for the row lock, then re-check `balance >= amount` against the committed row
# (EvalPlanQual), so two debits can never both pass on the same funds. The CHECK constraint backs it up.
# A concurrent duplicate of the same Idempotency-Key passes NOT EXISTS (both saw no key), but the second
# INSERT then hits transactions_idempotency_key_unique and the whole statement rolls back: no double charge.
CHARGE: LiteralString = f"""
WITH {EXISTING_TRANSACTION},
debited AS (
    UPDATE accounts
    SET balance = balance - %(amount)s, last_seq = last_seq + 1,
        {DRAW_SET},
        {lowering_set("balance - held - %(amount)s")}
    WHERE user_id = %(user_id)s
      -- Draws on available, not balance: tokens held for running agents are not for plain charges.
      AND balance - held >= %(amount)s
      AND {NOTHING_DUE}
      AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING user_id, last_seq, last_draw, updated_at, {ACCOUNT_RETURNING}
),
inserted AS (
    INSERT INTO transactions ({LEDGER_ROW_COLUMNS}, created_at)
    SELECT user_id, last_seq, 'debit', -%(amount)s, balance, %(description)s, %(metadata)s,
           %(idempotency_key)s, %(request_hash)s, %(posted_by)s, %(request_id)s, last_draw, updated_at
    FROM debited
    RETURNING {LEDGER_RETURNING}
),
-- The outbox, in the same statement: the ledger row's transaction.posted, and balance.low if this crossed.
outbox AS (
    {EVENT_COLUMNS}
    SELECT d.user_id, d.last_event_seq - d.crossed::int, 'transaction.posted', {POSTED_DATA}, d.last_event_txid
    FROM debited d CROSS JOIN inserted i
    WHERE %(events)s
    UNION ALL
    {low_event("debited")}
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN a.user_id IS NULL THEN 'account_not_found'
            ELSE 'insufficient_balance' END AS outcome,
       coalesce(e.id, i.id) AS transaction_id,
       coalesce(e.balance_after, i.balance_after, a.balance - a.held) AS balance,
       e.request_hash,
       a.depleted_notified,
       NULL::uuid AS grant_id
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
LEFT JOIN accounts a ON a.user_id = %(user_id)s
"""

# Credit: opens the account on first use (with the service's default low-balance threshold). ON CONFLICT takes
# the row lock, so credits serialise like debits. A credit re-arms balance.low and balance.depleted.
# Every credit is a grant: its slot goes into the account's draw order, its row into `grants`.
CREDIT: LiteralString = f"""
WITH {EXISTING_TRANSACTION},
new_grant AS (SELECT billing_uuidv7() AS id, clock_timestamp() AS at),
credited AS (
    INSERT INTO accounts AS a (user_id, balance, last_seq, last_event_seq, last_event_txid, low_balance_threshold,
                               grants, next_expiry)
    SELECT %(user_id)s, %(amount)s, 1, CASE WHEN %(events)s THEN 1 ELSE 0 END,
           CASE WHEN %(events)s THEN pg_current_xact_id() ELSE '0'::xid8 END, %(default_threshold)s::bigint,
           ARRAY[ROW(n.id, %(amount)s, %(priority)s, %(expires_at)s, n.at)::billing_grant_slot],
           %(expires_at)s::timestamptz
    FROM new_grant n
    WHERE NOT EXISTS (SELECT 1 FROM existing)
      -- Checked here, after the key: a retry of a credit whose grant has expired since still replays.
      AND coalesce(%(expires_at)s::timestamptz > statement_timestamp(), true)
    ON CONFLICT (user_id) DO UPDATE
    SET balance = a.balance + excluded.balance, last_seq = a.last_seq + 1, updated_at = now(),
        grants = billing_slot_insert(a.grants, excluded.grants[1]),
        next_expiry = least(a.next_expiry, excluded.next_expiry),
        depleted_notified = false,
        {raising_set("a.balance + excluded.balance - a.held", prefix="a.")}
    -- Like a debit, a credit waits for a due grant's expiry row, so its balance_after is exact too.
    WHERE coalesce(a.next_expiry > clock_timestamp(), true)
    RETURNING user_id, balance, last_seq, last_event_seq, last_event_txid
),
granted AS (
    INSERT INTO grants (user_id, id, amount, priority, category, expires_at, source, created_at)
    SELECT c.user_id, n.id, %(amount)s, %(priority)s, %(category)s, %(expires_at)s, %(source)s, n.at
    FROM credited c CROSS JOIN new_grant n
),
inserted AS (
    INSERT INTO transactions ({LEDGER_ROW_COLUMNS}, grant_id)
    SELECT c.user_id, c.last_seq, 'credit', %(amount)s, c.balance, %(description)s, %(metadata)s,
           %(idempotency_key)s, %(request_hash)s, %(posted_by)s, %(request_id)s,
           jsonb_build_array(jsonb_build_object('grant_id', n.id, 'amount', %(amount)s::bigint)), n.id
    FROM credited c CROSS JOIN new_grant n
    RETURNING {LEDGER_RETURNING}
),
outbox AS (
    {EVENT_COLUMNS}
    SELECT c.user_id, c.last_event_seq, 'transaction.posted', {POSTED_DATA}, c.last_event_txid
    FROM credited c CROSS JOIN inserted i
    WHERE %(events)s
)
SELECT CASE WHEN e.id IS NOT NULL THEN 'replayed'
            WHEN i.id IS NOT NULL THEN 'applied'
            WHEN %(expires_at)s::timestamptz <= statement_timestamp() THEN 'already_expired'
            ELSE 'grants_due' END AS outcome,
       coalesce(e.id, i.id) AS transaction_id,
       coalesce(e.balance_after, i.balance_after) AS balance,
       e.request_hash,
       NULL::boolean AS depleted_notified,
       coalesce(e.grant_id, i.grant_id) AS grant_id
FROM (VALUES (1)) AS one
LEFT JOIN existing e ON true
LEFT JOIN inserted i ON true
"""

# After a unique violation on the key: the concurrent twin committed first, so its row is now visible.
IDEMPOTENT_REPLAY: LiteralString = """
SELECT id, balance_after, request_hash, grant_id
FROM transactions
WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
"""

OPEN_ACCOUNT: LiteralString = """
INSERT INTO accounts (user_id, open_idempotency_key, low_balance_threshold)
VALUES (%(user_id)s, %(idempotency_key)s, %(low_balance_threshold)s)
ON CONFLICT (user_id) DO NOTHING
RETURNING balance
"""

ACCOUNT: LiteralString = """
SELECT balance, open_idempotency_key FROM accounts WHERE user_id = %(user_id)s
"""

# A new threshold re-arms the alert: the next debit below it fires.
SET_THRESHOLD: LiteralString = """
UPDATE accounts
SET low_balance_threshold = %(low_balance_threshold)s, low_balance_armed = true, updated_at = now()
WHERE user_id = %(user_id)s
RETURNING user_id, balance, held, low_balance_threshold
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
    'hold_id', hold_id, 'posted_by', posted_by, 'request_id', request_id, 'funding', funding,
    'grant_id', grant_id, 'refund_of', refund_of
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

# Ledger rows with no recorded caller: written before migration 0004, or by a path that forgot to say.
UNATTRIBUTED_ROWS: LiteralString = "SELECT count(*) FROM transactions WHERE posted_by IS NULL"

PING: LiteralString = "SELECT 1"


# Exact even with no sweeper, in one snapshot: what is live now. Active roots past their expiry (and so
# their whole trees) no longer reserve; their allocation comes back to available where its grant is still
# live. A grant past its expiry no longer counts. The common case (nothing due) costs one row read: the
# expensive branches run only when a hold or a grant is due and not swept yet.
# expiring: the live tokens that expire within 7 days; next_expiry: the soonest expiry of a live grant.
_BALANCE_COLUMNS: LiteralString = """
       a.held - coalesce(x.remaining, 0) AS held,
       CASE WHEN coalesce(a.next_expiry > statement_timestamp(), true) THEN a.balance - a.held
            ELSE billing_live(a.grants, statement_timestamp()) END + coalesce(x.live_allocation, 0) AS available,
       CASE WHEN a.next_expiry <= statement_timestamp() + interval '7 days' THEN (
           SELECT coalesce(sum(s.remaining), 0) FROM unnest(a.grants) s
           WHERE s.expires_at > statement_timestamp() AND s.expires_at <= statement_timestamp() + interval '7 days'
       ) ELSE 0 END AS expiring,
       CASE WHEN coalesce(a.next_expiry > statement_timestamp(), true) THEN a.next_expiry ELSE (
           SELECT min(s.expires_at) FROM unnest(a.grants) s
           WHERE s.remaining > 0 AND s.expires_at > statement_timestamp()
       ) END AS next_expiry
"""

_BALANCE_FROM: LiteralString = """FROM accounts a
LEFT JOIN LATERAL (
    SELECT sum(h.remaining) AS remaining,
           (SELECT sum(hf.amount) FROM hold_funding hf
            JOIN grants g ON g.user_id = hf.user_id AND g.id = hf.grant_id
            WHERE hf.user_id = a.user_id AND hf.amount > 0 AND hf.root_id = ANY(array_agg(DISTINCT r.id))
              AND g.voided_at IS NULL AND coalesce(g.expires_at > statement_timestamp(), true)) AS live_allocation
    FROM holds r
    JOIN holds h ON h.user_id = r.user_id AND h.root_id = r.id AND h.status = 'active'
    WHERE r.user_id = a.user_id AND r.parent_id IS NULL AND r.status = 'active'
      AND r.expires_at <= statement_timestamp()
    HAVING count(*) > 0
) x ON true
"""

BALANCE_WITH_HOLDS: LiteralString = f"SELECT{_BALANCE_COLUMNS}{_BALANCE_FROM}WHERE a.user_id = %(user_id)s"

# The same for many accounts in one statement (ledger/read_batcher.py): one snapshot, one row per account found.
BALANCES_WITH_HOLDS: LiteralString = (
    f"SELECT a.user_id,{_BALANCE_COLUMNS}{_BALANCE_FROM}WHERE a.user_id = ANY(%(user_ids)b::uuid[])"
)

# The live balance by grant category (paid, promotional), from the account's slots.
BALANCE_BY_CATEGORY: LiteralString = """
SELECT g.category, sum(s.remaining)::bigint
FROM accounts a CROSS JOIN unnest(a.grants) s
JOIN grants g ON g.user_id = a.user_id AND g.id = s.grant_id
WHERE a.user_id = %(user_id)s AND coalesce(s.expires_at > statement_timestamp(), true)
GROUP BY g.category
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
    'group', {group_value},
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


# Two keys at once (the console's spend per day stacked by model): the group is an object of both.
USAGE_GROUP_PAIRS: dict[str, tuple[LiteralString, LiteralString]] = {
    "day,model": ("day", "model"),
}


def usage(group_by: str) -> LiteralString:
    if group_by in USAGE_GROUP_PAIRS:
        first, second = USAGE_GROUP_PAIRS[group_by]
        key: LiteralString = USAGE_GROUP_KEYS[first] + ", " + USAGE_GROUP_KEYS[second]
        value: LiteralString = (
            "json_build_object('"
            + first
            + "', "
            + USAGE_GROUP_KEYS[first]
            + ", '"
            + second
            + "', "
            + USAGE_GROUP_KEYS[second]
            + ")"
        )
        return _USAGE.replace("{group_value}", value).replace("{group_key}", key)
    return _USAGE.replace("{group_value}", USAGE_GROUP_KEYS[group_by]).replace(
        "{group_key}", USAGE_GROUP_KEYS[group_by]
    )


# The balance over time: (created_at, balance_after) of the newest rows in a time range, newest first, from
# transactions_user_created_at (created_at rises with seq). The console draws it as a line.
BALANCE_SERIES: LiteralString = """
SELECT created_at, balance_after
FROM transactions
WHERE user_id = %(user_id)s AND created_at >= %(since)s AND created_at < %(until)s
ORDER BY created_at DESC, seq DESC
LIMIT %(limit)s
"""

# Accounts by user id prefix: the prefix bounds a range of the primary key, so this is an index range scan.
ACCOUNTS_IN_RANGE: LiteralString = """
SELECT user_id, balance, held, updated_at
FROM accounts
WHERE user_id BETWEEN %(low)s AND %(high)s
ORDER BY user_id
LIMIT %(limit)s
"""

# The most recently active accounts. Deliberately unindexed: an index on updated_at would turn every charge's
# HOT update of its account row into an index write. A top-N sort over accounts, for an operator's page.
RECENT_ACCOUNTS: LiteralString = """
SELECT user_id, balance, held, updated_at
FROM accounts
ORDER BY updated_at DESC
LIMIT %(limit)s
"""


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


# ---------------------------------------------------------------------------------------------------------
# Batched charges (batcher.py): one transaction for many charges, decided in Python under the row locks.

# The batch's rows reach PostgreSQL as one JSON document each (json_to_recordset): the batcher encodes a batch
# in one msgspec call (~5 µs) where psycopg's array dumpers spent ~300 µs of Python on a batch's 25 arrays, and
# PostgreSQL parses a document as cheaply as it receives an array (docs/performance.md, round five). Request
# hashes travel as hex. The lock keeps a binary array: ANY() over an array is what uses the primary key.

# Sorted, so every batch takes its locks in the same order and two batches can never deadlock.
BATCH_LOCK_ACCOUNTS: LiteralString = """
SELECT user_id, balance, held, last_seq, last_event_seq, low_balance_threshold, low_balance_armed,
       low_balance_event_seq, depleted_notified, next_expiry, to_jsonb(grants)
FROM accounts
WHERE user_id = ANY(%(user_ids)b::uuid[])
ORDER BY user_id
FOR UPDATE
"""

# After the locks, in one statement: the batch's instant (its charges are decided, and their rows stamped, as of
# it) and the keys already spent, in a snapshot that sees whatever the lock's previous holders committed.
BATCH_PLANNED_AT_AND_KEYS: LiteralString = """
SELECT clock_timestamp(),
       (SELECT json_agg(json_build_array(t.user_id, t.idempotency_key, t.id, t.balance_after,
                                         encode(t.request_hash, 'hex')))
        FROM json_to_recordset(%(keys)s::json) AS k(user_id uuid, idempotency_key text)
        JOIN transactions t ON t.user_id = k.user_id AND t.idempotency_key = k.idempotency_key)
"""


def batch_ledger_rows(row_type: LiteralString) -> LiteralString:
    """The CTEs `planned` (a batch's ledger rows as its plan numbered them, from the JSON document %(rows)s: one
    object per row, hold_id only on captures) and `inserted` (those rows, of type `row_type`, stamped with the
    batch's instant), for the charge and capture batchers' apply statements."""
    return f"""planned AS (
    SELECT *
    FROM json_to_recordset(%(rows)s::json)
         AS p(user_id uuid, seq bigint, amount bigint, balance_after bigint, description text, metadata jsonb,
              idempotency_key text, request_hash text, event_seq bigint, posted_by text, request_id text,
              funding jsonb, hold_id uuid)
),
inserted AS (
    INSERT INTO transactions ({LEDGER_ROW_COLUMNS}, hold_id, created_at)
    SELECT user_id, seq, '{row_type}', -amount, balance_after, description, metadata, idempotency_key,
           decode(request_hash, 'hex'), posted_by, request_id, funding, hold_id, %(planned_at)s
    FROM planned
    ORDER BY user_id, seq
    RETURNING {LEDGER_RETURNING}, seq
)"""


# The SELECT of the batch's transaction.posted events, one per inserted row at the event seq the plan gave it.
BATCH_POSTED_EVENTS: LiteralString = f"""SELECT i.user_id, p.event_seq, 'transaction.posted', {POSTED_DATA},
           greatest(a.last_event_txid, pg_current_xact_id())
    FROM inserted i JOIN planned p ON p.user_id = i.user_id AND p.seq = i.seq
    JOIN accounts a ON a.user_id = i.user_id  -- the snapshot's row: its txid before this statement
    WHERE %(events)s"""

# The plan was computed from the locked rows, so setting each account's final state is exact; the CHECK
# constraints and `billing audit` would catch a plan that broke the chain. The outbox rides along: each ledger
# row's transaction.posted (at the event seq the plan gave it), and the plan's other events (balance.low
# crossings, balance.depleted), in the same statement.
BATCH_APPLY: LiteralString = f"""
WITH {batch_ledger_rows("debit")},
outbox AS (
    {EVENT_COLUMNS}
    {BATCH_POSTED_EVENTS}
    UNION ALL
    SELECT e.user_id, e.seq, e.type, e.data, greatest(a.last_event_txid, pg_current_xact_id())
    FROM json_to_recordset(%(other_events)s::json) AS e(user_id uuid, seq bigint, type text, data json)
    JOIN accounts a ON a.user_id = e.user_id
),
updated AS (
    UPDATE accounts a
    SET balance = s.balance, last_seq = s.last_seq, last_event_seq = s.last_event_seq,
        low_balance_armed = s.armed, low_balance_event_seq = s.low_event_seq, depleted_notified = s.depleted,
        last_event_txid = CASE WHEN %(events)s THEN greatest(a.last_event_txid, pg_current_xact_id())
                               ELSE a.last_event_txid END,
        -- Draws empty slots strictly in order: the plan dropped the first `dropped` slots and left the next one
        -- holding `first_remaining`. The row is locked by BATCH_LOCK_ACCOUNTS, so a.grants is what was planned on.
        grants = CASE WHEN s.dropped >= cardinality(a.grants) THEN '{{}}'::billing_grant_slot[]
                      ELSE array_prepend(
                          ROW((a.grants[s.dropped + 1]).grant_id, s.first_remaining, (a.grants[s.dropped + 1]).priority,
                              (a.grants[s.dropped + 1]).expires_at, (a.grants[s.dropped + 1]).created_at
                          )::billing_grant_slot,
                          a.grants[s.dropped + 2:]) END,
        next_expiry = CASE WHEN s.dropped > 0 THEN billing_next_expiry(a.grants[s.dropped + 1:]) ELSE a.next_expiry END,
        updated_at = %(planned_at)s
    FROM json_to_recordset(%(accounts)s::json)
         AS s(user_id uuid, balance bigint, last_seq bigint, last_event_seq bigint, armed boolean,
              low_event_seq bigint, depleted boolean, dropped int, first_remaining bigint)
    WHERE a.user_id = s.user_id
)
SELECT user_id, seq, id FROM inserted
"""


# ---------------------------------------------------------------------------------------------------------
# `billing demo` only (cli.py): spread a freshly seeded demo account's rows over the past month. The caller
# passes times that rise with the rows' seq, all in the past, for an account the demo itself just opened, so
# created_at keeps rising with seq (the invariant balance_at relies on). Never called by the API.
DEMO_BACKDATE: LiteralString = """
UPDATE transactions t
SET created_at = s.at
FROM unnest(%(ids)s::uuid[], %(ats)s::timestamptz[]) AS s(id, at)
WHERE t.user_id = %(user_id)s AND t.id = s.id AND s.at < t.created_at
"""
