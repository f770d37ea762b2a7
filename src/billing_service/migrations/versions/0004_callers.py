"""Callers: who posted each ledger row and hold, named service tokens kept in the database, and the shared
counters of the rate limiter.

- `transactions.posted_by` / `holds.posted_by`: the name of the token that wrote the row (never its secret),
  or `cli:<os user>` for the CLI; `request_id` the X-Request-ID of the request. Nullable: rows written before
  this migration have none, and `billing audit` counts them as a warning. Adding a nullable column without a
  default is a catalogue change only: no table rewrite, instant on a large ledger.
- `service_tokens`: tokens made with `billing tokens create`; only the SHA-256 of the secret is stored. A
  revoked token keeps its row (and its name, which is never reused) so `posted_by` stays unambiguous.
- `rate_limit_demand`: UNLOGGED (nothing in it survives a crash, nothing needs to): each worker's recent
  request rate per limited key, from which every worker computes its share of the global budget.

Revision ID: 0004
Revises: 0002 (re-chained after 0003 on merge)
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.execute("""
    ALTER TABLE transactions ADD COLUMN posted_by text, ADD COLUMN request_id text;
    ALTER TABLE holds ADD COLUMN posted_by text, ADD COLUMN request_id text;

    CREATE TABLE service_tokens (
        id text PRIMARY KEY,
        name text NOT NULL CONSTRAINT service_tokens_name_unique UNIQUE,
        scopes text[] NOT NULL,
        token_hash bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        last_used_at timestamptz,
        revoked_at timestamptz,
        CONSTRAINT service_tokens_scopes_known
            CHECK (scopes <@ ARRAY['charge', 'credit', 'read', 'admin'] AND cardinality(scopes) > 0)
    );

    CREATE UNLOGGED TABLE rate_limit_demand (
        key text NOT NULL,
        worker text NOT NULL,
        demand double precision NOT NULL,
        seen_at timestamptz NOT NULL,
        PRIMARY KEY (key, worker)
    );
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE rate_limit_demand;
    DROP TABLE service_tokens;
    ALTER TABLE holds DROP COLUMN posted_by, DROP COLUMN request_id;
    ALTER TABLE transactions DROP COLUMN posted_by, DROP COLUMN request_id;
    """)
