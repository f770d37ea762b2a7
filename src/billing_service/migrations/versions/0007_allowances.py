"""Allowances: a grant at the start of every calendar period (day, week, month) in a time zone.

`allowances` holds the terms and `next_period_at`, the start of the next period not yet granted (the
granter's index). `allowance_periods` holds one row per granted period: its primary key makes a period
unique, and the row is written *before* its credit (a claim, with the amount fixed, rollover included), so
that every process that races to grant the period credits the same request under the same Idempotency-Key
(`allowance:{id}:{period start}`): exactly one credit, the others replay it. `grant_id` is null only between
the claim and the credit; the granter finishes such a claim before anything else.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.execute("""
    CREATE TABLE allowances (
        user_id uuid NOT NULL,
        id uuid NOT NULL DEFAULT billing_uuidv7(),
        amount bigint NOT NULL CHECK (amount > 0),
        period text NOT NULL CHECK (period IN ('day', 'week', 'month')),
        timezone text NOT NULL,
        anchor timestamptz NOT NULL,
        rollover boolean NOT NULL,
        rollover_cap bigint NOT NULL CHECK (rollover_cap >= 0),
        priority smallint NOT NULL CHECK (priority BETWEEN 0 AND 100),
        category text NOT NULL CHECK (category IN ('paid', 'promotional')),
        description text NOT NULL,
        next_period_at timestamptz NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        stopped_at timestamptz,
        posted_by text,
        idempotency_key text,
        request_hash bytea,
        PRIMARY KEY (user_id, id),
        CONSTRAINT allowances_idempotency_key_unique UNIQUE (user_id, idempotency_key)
    );
    CREATE INDEX allowances_id ON allowances (id);
    CREATE INDEX allowances_due ON allowances (next_period_at) WHERE stopped_at IS NULL;

    CREATE TABLE allowance_periods (
        user_id uuid NOT NULL,
        allowance_id uuid NOT NULL,
        period_start timestamptz NOT NULL,
        period_end timestamptz NOT NULL CHECK (period_end > period_start),
        amount bigint NOT NULL CHECK (amount > 0),
        rolled_over bigint NOT NULL CHECK (rolled_over >= 0),
        grant_id uuid,
        transaction_id uuid,
        claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (user_id, allowance_id, period_start),
        FOREIGN KEY (user_id, allowance_id) REFERENCES allowances (user_id, id)
    );
    CREATE INDEX allowance_periods_pending ON allowance_periods (claimed_at) WHERE grant_id IS NULL;

    -- What a period's grant had left when it expired is what its expiry rows wrote off (for rollover).
    CREATE INDEX transactions_user_grant_expiry ON transactions (user_id, grant_id) WHERE type = 'expiry';
    """)


def downgrade() -> None:
    op.execute("""
    DROP INDEX transactions_user_grant_expiry;
    DROP TABLE allowance_periods;
    DROP TABLE allowances;
    """)
