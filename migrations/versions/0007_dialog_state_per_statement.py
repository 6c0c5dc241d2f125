"""A dialog's new state is sent once per INSERT statement on messages, not once per row.

Revision ID: 0007_dialog_state_per_statement
Revises: 0006_presence
Create Date: 2026-12-07

Until now ``messages_notify`` sent, after each row, the message and then its
dialog's new state (for inboxes). An INSERT of many rows (an announcement to
many dialogs, 10 messages each) so sent two notifications per message, and the
second of each pair was stale before the statement ended: every gateway received
and dropped it (or sent it to inboxes, only to be overtaken a row later).

Now ``messages_notify`` sends the message only, and ``messages_notify_dialogs``
(AFTER INSERT, FOR EACH STATEMENT, over the statement's new rows) sends the state
of each dialog the statement wrote to, once, after all of the statement's
messages. A single-row INSERT — every write of the backend, group commit included
(each write is its own statement), and psql's — still sends the message, then its
dialog's state. Order is unchanged where it matters: a dialog's state follows the
messages it counts, and notifications are delivered on commit, in commit order.
"""

from alembic import op

revision = "0007_dialog_state_per_statement"
down_revision = "0006_presence"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION replyx_notify_message() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            payload text := replyx_message_json(NEW);
        BEGIN
            IF octet_length(payload) >= 8000 THEN
                payload := '{"type":"message_ref","dialog_id":' || NEW.dialog_id
                    || ',"seq":' || NEW.seq || ',"id":' || NEW.id || '}';
            END IF;
            PERFORM pg_notify('replyx_events', payload);
            RETURN NULL;
        END
        $$;

        -- After a statement's messages (row triggers fire first): each dialog it wrote to.
        CREATE FUNCTION replyx_notify_dialogs_written() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('replyx_events', replyx_dialog_json(d))
               FROM dialogs d
              WHERE d.id IN (SELECT dialog_id FROM written)
              ORDER BY d.id;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER messages_notify_dialogs
            AFTER INSERT ON messages
            REFERENCING NEW TABLE AS written
            FOR EACH STATEMENT EXECUTE FUNCTION replyx_notify_dialogs_written();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER messages_notify_dialogs ON messages;
        DROP FUNCTION replyx_notify_dialogs_written();
        CREATE OR REPLACE FUNCTION replyx_notify_message() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            payload text := replyx_message_json(NEW);
        BEGIN
            IF octet_length(payload) >= 8000 THEN
                payload := '{"type":"message_ref","dialog_id":' || NEW.dialog_id
                    || ',"seq":' || NEW.seq || ',"id":' || NEW.id || '}';
            END IF;
            PERFORM pg_notify('replyx_events', payload);
            PERFORM pg_notify('replyx_events', replyx_dialog_json(d)) FROM dialogs d
             WHERE d.id = NEW.dialog_id;
            RETURN NULL;
        END
        $$;
        """
    )
