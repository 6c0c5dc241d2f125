"""Failed logins per client address, shared by every backend worker.

Revision ID: 0002_login_failures
Revises: 0001_initial
Create Date: 2026-11-26

The backend runs as four gunicorn workers, so a counter in one worker's memory
would let an address try four times the limit (and every restart reset it).
The count lives here instead: one row per address (an IPv6 /64 counts as one),
``failures`` attempts in the window that began at ``window_start``.
"""

from alembic import op

revision = "0002_login_failures"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE login_failures (
            address      text PRIMARY KEY,
            failures     integer NOT NULL CHECK (failures >= 0),
            window_start timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX login_failures_window_start_idx ON login_failures (window_start);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE login_failures;")
