"""Messages are an append-only log: a message goes away only with its dialog.

Revision ID: 0003_messages_append_only
Revises: 0002_login_failures
Create Date: 2026-11-26

A dialog's seqs are 1, 2, 3… with no holes, and clients resume by seq. Deleting
one message by hand would leave a hole that every client would wait on. To take
a message's content away, UPDATE its text; to drop a conversation, DELETE its
dialog (the cascade still removes the messages: by then the dialog row is gone,
which is what the trigger checks).
"""

from alembic import op

revision = "0003_messages_append_only"
down_revision = "0002_login_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION replyx_keep_messages() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM dialogs WHERE id = OLD.dialog_id) THEN
                RAISE check_violation USING
                    MESSAGE = format('message %s of dialog %s: messages are append-only'
                                     ' (UPDATE its text, or DELETE the dialog)',
                                     OLD.id, OLD.dialog_id);
            END IF;
            RETURN OLD;
        END
        $$;

        CREATE TRIGGER messages_append_only
            BEFORE DELETE ON messages
            FOR EACH ROW EXECUTE FUNCTION replyx_keep_messages();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER messages_append_only ON messages;
        DROP FUNCTION replyx_keep_messages();
        """
    )
