"""Every SQL statement the service runs. Nothing else in the package writes SQL.

Each write is ONE statement, and so one round trip and one transaction (the pool runs in autocommit):
the conditional UPDATE of the account feeds the INSERT of its ledger row through a CTE, so the debit and
its row commit together or not at all, and no balance is ever read and then written.
"""

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
      AND balance >= %(amount)s
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
       coalesce(e.balance_after, i.balance_after, a.balance) AS balance,
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
    'created_at', created_at, 'type', type, 'balance_after', balance_after, 'metadata', metadata
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
