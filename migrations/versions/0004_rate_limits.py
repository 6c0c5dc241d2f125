"""Token buckets for the anonymous endpoints, shared by every backend worker.

Revision ID: 0004_rate_limits
Revises: 0003_messages_append_only
Create Date: 2026-11-27

Widget visitors (and site integrations) call the API without an operator's
login; each call is counted against its client address and, for the widget,
its guest token. As with ``login_failures``, a counter in one worker's memory
would give an address the limit once per worker: the buckets live here.

One row per bucket (``key`` names the limit and whom it counts, say
``widget-dialog:203.0.113.7``). ``tokens`` is what was left at ``updated_at``;
the bucket refills at ``rate`` per second up to ``burst``. ``rate`` and
``burst`` are kept in the row so the one UPSERT that takes a token reads them
from ``EXCLUDED`` (the settings of the worker that asks). ``refused`` says
whether the latest request found the bucket empty.
"""

from alembic import op

revision = "0004_rate_limits"
down_revision = "0003_messages_append_only"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rate_limits (
            key        text PRIMARY KEY,
            tokens     double precision NOT NULL,
            rate       double precision NOT NULL CHECK (rate > 0),
            burst      double precision NOT NULL CHECK (burst >= 1),
            refused    boolean NOT NULL DEFAULT false,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX rate_limits_updated_at_idx ON rate_limits (updated_at);
        -- CORS preflights ask "is this origin any assistant's domain?".
        CREATE INDEX assistants_domains_idx ON assistants USING gin (domains);
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX assistants_domains_idx; DROP TABLE rate_limits;")
