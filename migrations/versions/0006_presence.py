"""Presence shared by every gateway: who is online, kept in unlogged tables with heartbeats.

Revision ID: 0006_presence
Revises: 0005_workspace
Create Date: 2026-11-27

Each gateway registers itself in ``gateways`` and renews ``expires_at`` with a
heartbeat; it lists what its own sockets make online: the operators of an
assistant with an inbox or dialog socket open (``presence_operators``) and the
dialogs with a widget socket open (``presence_visitors``). Counts only ever
consider gateways whose ``expires_at`` is in the future, so a gateway that dies
without a word (SIGKILL, a lost host) stops counting when its lease runs out,
and any gateway's sweep deletes it (its rows go with it).

The tables are UNLOGGED: presence is not worth a WAL write per connect, and a
crash that empties them is repaired by the gateways, which publish their whole
state again whenever their row is missing.
"""

from alembic import op

revision = "0006_presence"
down_revision = "0005_workspace"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE UNLOGGED TABLE gateways (
            id           uuid PRIMARY KEY,
            name         text NOT NULL,
            started_at   timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            expires_at   timestamptz NOT NULL
        );
        CREATE UNLOGGED TABLE presence_operators (
            gateway_id   uuid NOT NULL REFERENCES gateways (id) ON DELETE CASCADE,
            assistant_id bigint NOT NULL,
            user_id      bigint NOT NULL,
            PRIMARY KEY (assistant_id, user_id, gateway_id)
        );
        CREATE INDEX presence_operators_gateway_idx ON presence_operators (gateway_id);
        CREATE UNLOGGED TABLE presence_visitors (
            gateway_id uuid NOT NULL REFERENCES gateways (id) ON DELETE CASCADE,
            dialog_id  bigint NOT NULL,
            PRIMARY KEY (dialog_id, gateway_id)
        );
        CREATE INDEX presence_visitors_gateway_idx ON presence_visitors (gateway_id);
        -- Counts presence publishes: a gateway applies a published total only if it is
        -- newer than what it read (at start, or reloading after a listener loss).
        CREATE UNLOGGED TABLE presence_version (
            id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
            v  bigint NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE presence_version; DROP TABLE presence_visitors;"
               " DROP TABLE presence_operators; DROP TABLE gateways;")
