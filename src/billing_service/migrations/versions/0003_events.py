"""Events: the transactional outbox, low-balance alerts, webhooks and their delivery log.

- `events` is the outbox: every statement that changes an account inserts its events in the same
  statement, so an event exists iff its change committed. `seq` orders an account's events
  (accounts.last_event_seq, bumped under the account row lock); `txid` (the writing transaction's id) is
  what makes the feed commit-safe: only events with txid < the oldest running transaction are served.
- accounts gain the low-balance threshold and its crossing state (armed, and the event seq of the last
  crossing, so a statement can tell from its RETURNING that it fired), and the depleted flag.
- webhooks, deliveries (one per event and subscribed webhook, with its retry state) and delivery_attempts
  (the log). deliveries and delivery_attempts are keyed by user_id first; webhooks are a small reference table.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.execute("""
    ALTER TABLE accounts
        ADD COLUMN last_event_seq bigint NOT NULL DEFAULT 0,
        -- The txid stamped on the account's newest event: never less than the previous one's, so the feed's
        -- (txid, user_id, seq) order keeps each account's seq order (see events/sql.py).
        ADD COLUMN last_event_txid xid8 NOT NULL DEFAULT '0',
        ADD COLUMN low_balance_threshold bigint CONSTRAINT low_balance_threshold_not_negative
            CHECK (low_balance_threshold >= 0),
        ADD COLUMN low_balance_armed boolean NOT NULL DEFAULT true,
        -- The event seq of the last balance.low: equal to last_event_seq right after the statement that fired it.
        ADD COLUMN low_balance_event_seq bigint,
        ADD COLUMN depleted_notified boolean NOT NULL DEFAULT false;

    CREATE TABLE events (
        -- No foreign key to accounts: the writer holds the account row lock already, and the check would
        -- cost the hot path a lookup per event.
        user_id uuid NOT NULL,
        seq bigint NOT NULL,
        id uuid NOT NULL DEFAULT billing_uuidv7(),
        type text NOT NULL,
        data json NOT NULL,
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (user_id, seq)
    );
    -- The feed and the dispatcher read in (txid, user_id, seq) order, below the snapshot's xmin.
    CREATE INDEX events_feed ON events (txid, user_id, seq);
    -- Replay by event id or by time (UUIDv7 ids rise with time).
    CREATE INDEX events_id ON events (id);

    CREATE TABLE webhooks (
        id uuid PRIMARY KEY DEFAULT billing_uuidv7(),
        url text NOT NULL,
        events text[] NOT NULL,
        description text,
        secret text NOT NULL,
        previous_secret text,
        previous_secret_expires_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE TABLE deliveries (
        user_id uuid NOT NULL,
        webhook_id uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        event_seq bigint NOT NULL,
        id uuid NOT NULL DEFAULT billing_uuidv7(),
        event_id uuid NOT NULL,
        event_type text NOT NULL,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts int NOT NULL DEFAULT 0,
        -- attempts made before the latest replay: the retry schedule restarts from here.
        schedule_start int NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        last_status_code int,
        last_error text,
        last_latency_ms double precision,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (user_id, webhook_id, event_seq)
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
    -- The head of each (account, webhook) queue: the pending delivery with no pending one before it.
    CREATE INDEX deliveries_pending ON deliveries (user_id, webhook_id, event_seq) WHERE status = 'pending';
    CREATE INDEX deliveries_log ON deliveries (webhook_id, id);

    CREATE TABLE delivery_attempts (
        user_id uuid NOT NULL,
        webhook_id uuid NOT NULL,
        event_seq bigint NOT NULL,
        attempt int NOT NULL,
        attempted_at timestamptz NOT NULL DEFAULT now(),
        status_code int,
        error text,
        latency_ms double precision NOT NULL,
        PRIMARY KEY (user_id, webhook_id, event_seq, attempt),
        FOREIGN KEY (user_id, webhook_id, event_seq) REFERENCES deliveries ON DELETE CASCADE
    );

    -- The dispatcher's sweeper finds holds whose lease ran out that no request has touched since.
    CREATE INDEX holds_active_by_expiry ON holds (expires_at) WHERE status = 'active';

    -- The dispatcher's position in the feed: events up to it have their deliveries.
    CREATE TABLE dispatcher_state (
        id int PRIMARY KEY CHECK (id = 1),
        txid xid8 NOT NULL,
        user_id uuid NOT NULL,
        seq bigint NOT NULL
    );
    INSERT INTO dispatcher_state VALUES (1, '0'::xid8, '00000000-0000-0000-0000-000000000000', 0);
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE dispatcher_state;
    DROP INDEX holds_active_by_expiry;
    DROP TABLE delivery_attempts;
    DROP TABLE deliveries;
    DROP TABLE webhooks;
    DROP TABLE events;
    ALTER TABLE accounts
        DROP COLUMN depleted_notified,
        DROP COLUMN low_balance_event_seq,
        DROP COLUMN low_balance_armed,
        DROP COLUMN low_balance_threshold,
        DROP COLUMN last_event_txid,
        DROP COLUMN last_event_seq;
    """)
