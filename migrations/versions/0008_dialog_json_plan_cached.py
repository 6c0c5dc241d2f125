"""A dialog's state is rendered by a PL/pgSQL function, whose plan each session keeps.

Revision ID: 0008_dialog_json_plan_cached
Revises: 0007_dialog_state_per_statement
Create Date: 2026-12-07

``replyx_dialog_json(d)`` renders a dialog as the inbox's ``dialog`` frame: after
every message (``messages_notify_dialogs``), with each read-state change and for
every row of an inbox page. It was a ``LANGUAGE sql`` function, and one with a
subquery (the last message), which Postgres never inlines: each statement that
called it planned its body again, so every message's commit paid for planning a
query (about 0.15 ms of a 0.55 ms single-row INSERT with its triggers, measured
on the 2-core bench machine against the embedded Postgres 16). A PL/pgSQL
function keeps the plan of its query for the session, so only the first call
plans it.

Invariant: the body, and so every rendered byte, is the one of migration 0005;
only the language changes. An inbox page (the gateway's snapshot, the backend's
pages) renders the same rows in the same time (50 and 1,000 rows, measured).
"""

from alembic import op

revision = "0008_dialog_json_plan_cached"
down_revision = "0007_dialog_state_per_statement"
branch_labels = None
depends_on = None

# The frame of migration 0005, but `visitor_online` (the gateway adds it).
_BODY = """
    json_build_object(
        'type', 'dialog', 'dialog_id', d.id, 'assistant_id', d.assistant_id,
        'channel', d.channel,
        'created_at', to_char(d.created_at AT TIME ZONE 'UTC',
                              'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'last_seq', d.last_seq,
        'last_message', (
            SELECT json_build_object(
                'seq', m.seq, 'sender', m.sender, 'text', left(m.text, 200),
                'created_at', to_char(m.created_at AT TIME ZONE 'UTC',
                                      'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
              FROM messages m WHERE m.dialog_id = d.id AND m.seq = d.last_seq),
        'operator_read_seq', d.operator_read_seq,
        'visitor_read_seq', d.visitor_read_seq,
        'unread', d.unread,
        'activity', d.activity)::text
"""


def upgrade() -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION replyx_dialog_json(d dialogs) RETURNS text
        LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
        BEGIN
            RETURN {_BODY};
        END
        $$;
        """
    )


def downgrade() -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION replyx_dialog_json(d dialogs) RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE AS $$
            SELECT {_BODY}
        $$;
        """
    )
