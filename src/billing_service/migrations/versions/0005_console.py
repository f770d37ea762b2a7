"""Console sessions: the server-side half of the web console's sign-in (src/billing_service/console/).

The session cookie holds a random session id, its expiry and an HMAC over both; no token. This table holds
only the SHA-256 of each id (a copy of the table signs nobody in), who it is for, and when it ends.
Sign-out sets revoked_at, so a replayed cookie is refused by every worker. Expired rows are pruned at sign-in.

Revision ID: 0005
Revises: 0003
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.execute("""
    CREATE TABLE console_sessions (
        id_hash bytea PRIMARY KEY,
        service boolean NOT NULL,
        user_id uuid,
        -- who signed in: the service token's fingerprint (never the token), or the user id
        subject text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        revoked_at timestamptz,
        CONSTRAINT console_session_subject CHECK (service OR user_id IS NOT NULL)
    );
    CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE console_sessions")
