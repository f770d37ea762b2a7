"""Holds (two-phase charges with leases and nested run budgets), captures in the ledger, usage indexes.

Accounting, kept exact by every hold statement and proved by `billing audit`:
- a hold's `remaining` is what it may still capture or carve into children; carving a child moves the
  amount from the parent's `remaining` into the child's, so the reserved tokens are counted once;
- `accounts.held` = sum(remaining) over active holds (expired but not yet swept ones included), kept under
  the account row lock, so the overdraft guard stays one conditional UPDATE: `balance - held >= amount`;
- every capture is a ledger row (type 'capture', negative, with its hold_id).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute("""
    ALTER TABLE accounts
        ADD COLUMN held bigint NOT NULL DEFAULT 0,
        ADD CONSTRAINT held_never_negative CHECK (held >= 0),
        -- available = balance - held never goes below 0: the last line of defence behind every guard.
        ADD CONSTRAINT held_within_balance CHECK (held <= balance);

    CREATE TABLE holds (
        user_id uuid NOT NULL REFERENCES accounts (user_id),
        id uuid NOT NULL DEFAULT billing_uuidv7(),
        parent_id uuid,
        root_id uuid NOT NULL,
        -- Ids from the root down to this hold: a subtree is `id = ANY(path)` within one root.
        path uuid[] NOT NULL CONSTRAINT hold_depth_limit CHECK (cardinality(path) BETWEEN 1 AND 8),
        amount bigint NOT NULL CHECK (amount > 0),
        remaining bigint NOT NULL CHECK (remaining >= 0),
        captured bigint NOT NULL DEFAULT 0 CHECK (captured >= 0),
        status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'captured', 'released', 'expired')),
        description text NOT NULL,
        metadata jsonb,
        expires_at timestamptz NOT NULL,
        idempotency_key text,
        request_hash bytea,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (user_id, id),
        CONSTRAINT holds_parent_fk FOREIGN KEY (user_id, parent_id) REFERENCES holds (user_id, id),
        CONSTRAINT holds_idempotency_key_unique UNIQUE (user_id, idempotency_key),
        CONSTRAINT holds_closed_hold_reserves_nothing CHECK (status = 'active' OR remaining = 0),
        CONSTRAINT holds_root_is_self CHECK ((parent_id IS NULL) = (root_id = id))
    );
    -- Capture, release and extend name a hold by id alone; ids are UUIDv7, so this index stays right-heavy.
    CREATE INDEX holds_id ON holds (id);
    CREATE INDEX holds_tree ON holds (user_id, root_id);
    -- Exact `available` subtracts the active roots that have expired but were not swept yet.
    CREATE INDEX holds_active_roots_by_expiry ON holds (user_id, expires_at)
        WHERE status = 'active' AND parent_id IS NULL;

    -- Idempotency-Keys of release and extend, which create no row of their own.
    CREATE TABLE hold_requests (
        user_id uuid NOT NULL REFERENCES accounts (user_id),
        idempotency_key text NOT NULL,
        request_hash bytea NOT NULL,
        hold_id uuid NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (user_id, idempotency_key),
        FOREIGN KEY (user_id, hold_id) REFERENCES holds (user_id, id)
    );

    ALTER TABLE transactions
        ADD COLUMN hold_id uuid,
        ADD CONSTRAINT transactions_hold_fk FOREIGN KEY (user_id, hold_id) REFERENCES holds (user_id, id),
        DROP CONSTRAINT transactions_type_check,
        ADD CONSTRAINT transactions_type_check CHECK (type IN ('debit', 'credit', 'capture')),
        DROP CONSTRAINT transactions_sign_matches_type,
        ADD CONSTRAINT transactions_sign_matches_type CHECK ((type IN ('debit', 'capture')) = (amount < 0)),
        ADD CONSTRAINT transactions_capture_names_its_hold CHECK ((type = 'capture') = (hold_id IS NOT NULL));

    -- Balance at a time T, history ?since=/?until= and usage by day: one range scan of one user's rows.
    CREATE INDEX transactions_user_created_at ON transactions (user_id, created_at, seq);
    -- History ?run_id= and usage per run: the run's rows only, in seq order for keyset pagination.
    CREATE INDEX transactions_user_run_id ON transactions (user_id, (metadata ->> 'run_id'), seq);
    CREATE INDEX transactions_user_hold ON transactions (user_id, hold_id) WHERE hold_id IS NOT NULL;
    """)


def downgrade() -> None:
    op.execute("""
    -- Captures stay in the ledger as plain debits, so every balance still equals its ledger.
    ALTER TABLE transactions DROP CONSTRAINT transactions_capture_names_its_hold;
    UPDATE transactions SET type = 'debit' WHERE type = 'capture';
    DROP INDEX transactions_user_hold;
    DROP INDEX transactions_user_run_id;
    DROP INDEX transactions_user_created_at;
    ALTER TABLE transactions
        DROP CONSTRAINT transactions_sign_matches_type,
        ADD CONSTRAINT transactions_sign_matches_type CHECK ((type = 'debit') = (amount < 0)),
        DROP CONSTRAINT transactions_type_check,
        ADD CONSTRAINT transactions_type_check CHECK (type IN ('debit', 'credit')),
        DROP CONSTRAINT transactions_hold_fk,
        DROP COLUMN hold_id;
    DROP TABLE hold_requests;
    DROP TABLE holds;
    ALTER TABLE accounts DROP COLUMN held;
    """)
