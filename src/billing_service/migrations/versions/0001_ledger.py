"""The ledger: accounts and their transactions.

Every table carries user_id and every key includes it, so the schema can be distributed by user_id
(Citus) with co-located tables.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute("""
    -- UUIDv7: time-ordered ids keep the index's right edge hot instead of scattering writes.
    -- PostgreSQL 18 ships uuidv7(); this works on 13+.
    CREATE FUNCTION billing_uuidv7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
      SELECT encode(
        set_bit(set_bit(
          overlay(uuid_send(gen_random_uuid())
                  placing substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                  FROM 1 FOR 6),
          52, 1), 53, 1),
        'hex')::uuid
    $$;

    CREATE TABLE accounts (
        user_id uuid PRIMARY KEY,
        -- The balance is stored, never summed on read; the audit proves it equals the ledger.
        balance bigint NOT NULL DEFAULT 0 CONSTRAINT balance_never_negative CHECK (balance >= 0),
        -- seq of the newest transaction: orders the ledger per account with no gaps.
        last_seq bigint NOT NULL DEFAULT 0,
        open_idempotency_key text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE TABLE transactions (
        user_id uuid NOT NULL REFERENCES accounts (user_id),
        seq bigint NOT NULL,
        id uuid NOT NULL DEFAULT billing_uuidv7(),
        type text NOT NULL CHECK (type IN ('debit', 'credit')),
        -- Signed: debits negative, credits positive, so sum(amount) = balance.
        amount bigint NOT NULL CHECK (amount <> 0),
        balance_after bigint NOT NULL CHECK (balance_after >= 0),
        description text NOT NULL,
        metadata jsonb,
        idempotency_key text,
        request_hash bytea,
        -- clock_timestamp(), taken while the account row is locked, so created_at rises with seq.
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (user_id, seq),
        CONSTRAINT transactions_id_unique UNIQUE (user_id, id),
        -- The key lives exactly as long as its transaction: a refused charge leaves none behind.
        CONSTRAINT transactions_idempotency_key_unique UNIQUE (user_id, idempotency_key),
        CONSTRAINT transactions_sign_matches_type CHECK ((type = 'debit') = (amount < 0))
    );
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE transactions;
    DROP TABLE accounts;
    DROP FUNCTION billing_uuidv7();
    """)
