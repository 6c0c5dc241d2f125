"""The operator's workspace: teams, read state, unread counts, dialog events.

Revision ID: 0005_workspace
Revises: 0004_rate_limits
Create Date: 2026-11-27

* **Teams.** ``assistant_operators`` lists who works on an assistant: its owner
  (added by a trigger when the assistant is created, and backfilled here) plus
  members (``replyx add-operator``). Every operator permission is "is a row here
  for the dialog's assistant". Removing a row sends ``operator_removed`` so
  every gateway closes that operator's sockets of the assistant (4001); adding
  one sends ``operator_added`` so open inboxes take the assistant in.
* **Read state.** ``dialogs.operator_read_seq`` / ``visitor_read_seq``: the
  highest seq each side has read. A BEFORE UPDATE trigger keeps them
  forward-only (a lower value is a no-op) and refuses one past ``last_seq``, for
  any writer, psql included.
* **Unread.** ``dialogs.unread`` = messages not sent by an operator with
  ``seq > operator_read_seq``. The seq trigger adds one per such message under
  the dialog's row lock; moving ``operator_read_seq`` subtracts the messages it
  passes (an index range on ``(dialog_id, seq)``), so a list never counts rows.
* **Activity.** ``dialogs.activity`` takes a new value of ``dialog_activity_seq``
  when the dialog is created and with each message: newest activity first is
  ``ORDER BY activity DESC`` on ``(assistant_id, activity)``, and an activity
  value is the paging cursor (unique, so no ties).
* **Events.** ``replyx_dialog_json(d)`` renders a dialog as the inbox's
  ``dialog`` frame (without ``visitor_online``, which is the gateway's). A
  ``dialog`` payload is sent when a dialog is created, after each message, and
  with each read-state change, which also sends ``read`` frames for the dialog's
  sockets. Like messages, they are sent by triggers and delivered on commit, in
  commit order, whoever wrote.
"""

from alembic import op

revision = "0005_workspace"
down_revision = "0004_rate_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE assistant_operators (
            assistant_id bigint NOT NULL REFERENCES assistants (id) ON DELETE CASCADE,
            user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            added_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (assistant_id, user_id)
        );
        CREATE INDEX assistant_operators_user_id_idx ON assistant_operators (user_id);
        INSERT INTO assistant_operators (assistant_id, user_id) SELECT id, user_id FROM assistants;

        CREATE FUNCTION replyx_owner_is_operator() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO assistant_operators (assistant_id, user_id)
            VALUES (NEW.id, NEW.user_id) ON CONFLICT DO NOTHING;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER assistants_owner_is_operator
            AFTER INSERT ON assistants
            FOR EACH ROW EXECUTE FUNCTION replyx_owner_is_operator();

        CREATE FUNCTION replyx_notify_team() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            row assistant_operators := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
        BEGIN
            PERFORM pg_notify('replyx_events', json_build_object(
                'type', CASE WHEN TG_OP = 'DELETE' THEN 'operator_removed'
                             ELSE 'operator_added' END,
                'assistant_id', row.assistant_id, 'user_id', row.user_id)::text);
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER assistant_operators_notify
            AFTER INSERT OR DELETE ON assistant_operators
            FOR EACH ROW EXECUTE FUNCTION replyx_notify_team();

        CREATE SEQUENCE dialog_activity_seq;
        ALTER TABLE dialogs
            ADD COLUMN operator_read_seq bigint NOT NULL DEFAULT 0,
            ADD COLUMN visitor_read_seq  bigint NOT NULL DEFAULT 0,
            ADD COLUMN unread            bigint NOT NULL DEFAULT 0,
            ADD COLUMN activity          bigint;
        UPDATE dialogs d SET
            unread = (SELECT count(*) FROM messages m
                       WHERE m.dialog_id = d.id AND m.sender <> 'operator'),
            activity = nextval('dialog_activity_seq');
        ALTER TABLE dialogs
            ALTER COLUMN activity SET DEFAULT nextval('dialog_activity_seq'),
            ALTER COLUMN activity SET NOT NULL,
            ADD CONSTRAINT dialogs_read_seqs_check CHECK (
                operator_read_seq BETWEEN 0 AND last_seq
                AND visitor_read_seq BETWEEN 0 AND last_seq AND unread >= 0);
        CREATE INDEX dialogs_assistant_activity_idx ON dialogs (assistant_id, activity DESC);

        -- A message: next seq, one more unread (unless an operator wrote it), new activity.
        CREATE OR REPLACE FUNCTION replyx_assign_seq() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            next_seq bigint;
        BEGIN
            UPDATE dialogs SET last_seq = last_seq + 1,
                               unread = unread + (NEW.sender <> 'operator')::int,
                               activity = nextval('dialog_activity_seq')
             WHERE id = NEW.dialog_id
            RETURNING last_seq INTO next_seq;
            IF NOT FOUND THEN
                RAISE foreign_key_violation USING
                    MESSAGE = format('dialog %s does not exist', NEW.dialog_id);
            END IF;
            IF NEW.seq IS NOT NULL AND NEW.seq <> next_seq THEN
                RAISE check_violation USING
                    MESSAGE = format('seq is assigned by the database: dialog %s is at seq %s',
                                     NEW.dialog_id, next_seq);
            END IF;
            NEW.seq := next_seq;
            RETURN NEW;
        END
        $$;

        -- Read seqs only move forward and never past last_seq; unread follows the operator's.
        CREATE FUNCTION replyx_keep_read_state() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.operator_read_seq > NEW.last_seq OR NEW.visitor_read_seq > NEW.last_seq THEN
                RAISE check_violation USING
                    MESSAGE = format('dialog %s: a read seq cannot pass last_seq %s',
                                     NEW.id, NEW.last_seq);
            END IF;
            NEW.operator_read_seq := greatest(OLD.operator_read_seq, NEW.operator_read_seq);
            NEW.visitor_read_seq := greatest(OLD.visitor_read_seq, NEW.visitor_read_seq);
            IF NEW.operator_read_seq > OLD.operator_read_seq THEN
                NEW.unread := NEW.unread - (
                    SELECT count(*) FROM messages m
                     WHERE m.dialog_id = NEW.id AND m.sender <> 'operator'
                       AND m.seq > OLD.operator_read_seq AND m.seq <= NEW.operator_read_seq);
            END IF;
            RETURN NEW;
        END
        $$;
        CREATE TRIGGER dialogs_keep_read_state
            BEFORE UPDATE OF operator_read_seq, visitor_read_seq ON dialogs
            FOR EACH ROW EXECUTE FUNCTION replyx_keep_read_state();

        -- The inbox's `dialog` frame, but `visitor_online` (the gateway adds it).
        CREATE FUNCTION replyx_dialog_json(d dialogs) RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE AS $$
            SELECT json_build_object(
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
        $$;

        CREATE FUNCTION replyx_notify_dialog() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' THEN
                IF NEW.operator_read_seq > OLD.operator_read_seq THEN
                    PERFORM pg_notify('replyx_events', json_build_object(
                        'type', 'read', 'dialog_id', NEW.id, 'side', 'operator',
                        'seq', NEW.operator_read_seq)::text);
                END IF;
                IF NEW.visitor_read_seq > OLD.visitor_read_seq THEN
                    PERFORM pg_notify('replyx_events', json_build_object(
                        'type', 'read', 'dialog_id', NEW.id, 'side', 'visitor',
                        'seq', NEW.visitor_read_seq)::text);
                END IF;
            END IF;
            PERFORM pg_notify('replyx_events', replyx_dialog_json(NEW));
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER dialogs_notify_created
            AFTER INSERT ON dialogs
            FOR EACH ROW EXECUTE FUNCTION replyx_notify_dialog();
        CREATE TRIGGER dialogs_notify_read
            AFTER UPDATE OF operator_read_seq, visitor_read_seq ON dialogs
            FOR EACH ROW
            WHEN (NEW.operator_read_seq > OLD.operator_read_seq
                  OR NEW.visitor_read_seq > OLD.visitor_read_seq)
            EXECUTE FUNCTION replyx_notify_dialog();

        -- After each message: its frame (or a reference), then its dialog's new state.
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


def downgrade() -> None:
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
        CREATE OR REPLACE FUNCTION replyx_assign_seq() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            next_seq bigint;
        BEGIN
            UPDATE dialogs SET last_seq = last_seq + 1
             WHERE id = NEW.dialog_id
            RETURNING last_seq INTO next_seq;
            IF NOT FOUND THEN
                RAISE foreign_key_violation USING
                    MESSAGE = format('dialog %s does not exist', NEW.dialog_id);
            END IF;
            IF NEW.seq IS NOT NULL AND NEW.seq <> next_seq THEN
                RAISE check_violation USING
                    MESSAGE = format('seq is assigned by the database: dialog %s is at seq %s',
                                     NEW.dialog_id, next_seq);
            END IF;
            NEW.seq := next_seq;
            RETURN NEW;
        END
        $$;
        DROP TRIGGER dialogs_notify_read ON dialogs;
        DROP TRIGGER dialogs_notify_created ON dialogs;
        DROP FUNCTION replyx_notify_dialog();
        DROP FUNCTION replyx_dialog_json(dialogs);
        DROP TRIGGER dialogs_keep_read_state ON dialogs;
        DROP FUNCTION replyx_keep_read_state();
        DROP INDEX dialogs_assistant_activity_idx;
        ALTER TABLE dialogs
            DROP CONSTRAINT dialogs_read_seqs_check,
            DROP COLUMN activity, DROP COLUMN unread,
            DROP COLUMN visitor_read_seq, DROP COLUMN operator_read_seq;
        DROP SEQUENCE dialog_activity_seq;
        DROP TRIGGER assistant_operators_notify ON assistant_operators;
        DROP FUNCTION replyx_notify_team();
        DROP TRIGGER assistants_owner_is_operator ON assistants;
        DROP FUNCTION replyx_owner_is_operator();
        DROP TABLE assistant_operators;
        """
    )
