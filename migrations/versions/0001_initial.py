"""Initial schema: users, assistants, dialogs, messages; seq and NOTIFY triggers.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-25

``seq`` is assigned by a BEFORE INSERT trigger that increments
``dialogs.last_seq`` under the dialog's row lock. The lock is held until the
inserting transaction ends, so writers to one dialog are serialised: seq order
is commit order, and a rollback undoes its increment (no holes).

An AFTER INSERT trigger sends the message on channel ``replyx_events``. NOTIFY is
transactional: delivered on commit, never on rollback, and in commit order. A
payload that would not fit under Postgres' 8000-byte limit is replaced by a
reference (``message_ref``) that the gateway resolves by reading the row.
"""

from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE users (
            id            bigserial PRIMARY KEY,
            email         text NOT NULL,
            password_hash text NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE UNIQUE INDEX users_email_key ON users (lower(email));

        CREATE TABLE assistants (
            id              bigserial PRIMARY KEY,
            user_id         bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            name            text NOT NULL,
            domains         text[] NOT NULL DEFAULT '{}',
            site_token_hash text NOT NULL UNIQUE,
            created_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX assistants_user_id_idx ON assistants (user_id);

        CREATE TABLE dialogs (
            id               bigserial PRIMARY KEY,
            assistant_id     bigint NOT NULL REFERENCES assistants (id) ON DELETE CASCADE,
            channel          text NOT NULL CHECK (channel IN ('widget', 'site')),
            guest_token_hash text UNIQUE,
            last_seq         bigint NOT NULL DEFAULT 0,
            created_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX dialogs_assistant_id_idx ON dialogs (assistant_id);

        CREATE TABLE messages (
            id         bigserial PRIMARY KEY,
            dialog_id  bigint NOT NULL REFERENCES dialogs (id) ON DELETE CASCADE,
            seq        bigint NOT NULL,
            sender     text NOT NULL
                       CHECK (sender IN ('visitor', 'operator', 'assistant', 'system')),
            text       text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT messages_dialog_seq_key UNIQUE (dialog_id, seq)
        );

        -- The one rendering of a message as a frame, shared by the NOTIFY trigger,
        -- the gateway's replay and the HTTP API, so all three are byte-identical.
        CREATE FUNCTION replyx_message_json(m messages) RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE AS $$
            SELECT '{"type":"message","dialog_id":' || m.dialog_id
                || ',"seq":' || m.seq
                || ',"id":' || m.id
                || ',"sender":' || to_json(m.sender)::text
                || ',"text":' || to_json(m.text)::text
                || ',"created_at":"'
                || to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                || '"}'
        $$;

        CREATE FUNCTION replyx_assign_seq() RETURNS trigger
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

        CREATE TRIGGER messages_assign_seq
            BEFORE INSERT ON messages
            FOR EACH ROW EXECUTE FUNCTION replyx_assign_seq();

        CREATE FUNCTION replyx_keep_seq() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id <> OLD.id OR NEW.dialog_id <> OLD.dialog_id OR NEW.seq <> OLD.seq THEN
                RAISE check_violation USING
                    MESSAGE = 'id, dialog_id and seq of a message never change';
            END IF;
            RETURN NEW;
        END
        $$;

        CREATE TRIGGER messages_keep_seq
            BEFORE UPDATE ON messages
            FOR EACH ROW EXECUTE FUNCTION replyx_keep_seq();

        CREATE FUNCTION replyx_notify_message() RETURNS trigger
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

        CREATE TRIGGER messages_notify
            AFTER INSERT ON messages
            FOR EACH ROW EXECUTE FUNCTION replyx_notify_message();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP FUNCTION replyx_message_json(messages);
        DROP TABLE messages;
        DROP FUNCTION replyx_notify_message();
        DROP FUNCTION replyx_keep_seq();
        DROP FUNCTION replyx_assign_seq();
        DROP TABLE dialogs;
        DROP TABLE assistants;
        DROP TABLE users;
        """
    )
