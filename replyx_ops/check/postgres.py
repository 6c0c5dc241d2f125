"""The database half of ``replyx check``: Postgres, schema, triggers, a NOTIFY round trip."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from replyx import schema
from replyx.pg import EmbeddedPostgres, libpq_url, redact_url
from replyx.protocol import LISTENER_APPLICATION as LISTENER_APP
from replyx.protocol import MAX_ID, NOTIFY_TRIGGERS
from replyx.protocol import NOTIFY_CHANNEL as CHANNEL
from replyx_ops.check.base import FAIL, PASS, SKIP, CheckFailed, Probe, Result, short

#: The triggers that make the architecture work (migrations 0001, 0003 and 0007).
TRIGGERS = ("messages_append_only", "messages_assign_seq", "messages_keep_seq", *NOTIFY_TRIGGERS)
#: A dialog id no dialog has: the check's NOTIFY is routed to nobody.
NOWHERE = MAX_ID


class PostgresChecks(Probe):

    def check_postgres(self) -> str:
        if self.settings.database_url:
            self.url = self.settings.database_url
            where = redact_url(self.url)
            hint = "is the server up, and DATABASE_URL right? `psql \"$DATABASE_URL\"` tells"
        else:
            embedded = EmbeddedPostgres(self.settings.data_dir)
            if not embedded.is_running():
                raise CheckFailed(
                    f"the embedded Postgres in {embedded.pgdata} is not running",
                    "start the stack with `replyx run` (or set DATABASE_URL to your server)",
                )
            self.url = embedded.url()
            where = f"embedded, {embedded.pgdata}"
            hint = f"see {embedded.log_file}"
        try:
            with self._connect() as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
        except psycopg.Error as exc:
            raise CheckFailed(f"cannot connect ({where}): {short(exc)}", hint) from None
        return f"Postgres {version} reachable ({where})"

    def check_schema(self) -> str:
        assert self.url is not None
        current = schema.current_revision(self.url)
        head = schema.head_revision()
        if current != head:
            found = "an empty database" if current is None else f"revision {current}"
            raise CheckFailed(f"at {found}, the code needs {head}", "run `replyx migrate`")
        return f"at head ({head})"

    def check_triggers(self) -> str:
        with self._connect() as conn:
            if conn.execute("SELECT to_regclass('messages')").fetchone()[0] is None:
                raise CheckFailed("no table messages", "run `replyx migrate`")
            rows = conn.execute(
                "SELECT tgname, tgenabled FROM pg_trigger"
                " WHERE tgrelid = 'messages'::regclass AND NOT tgisinternal"
            ).fetchall()
            source = conn.execute(
                "SELECT prosrc FROM pg_proc WHERE proname = 'replyx_notify_message'"
            ).fetchone()
        state = dict(rows)
        missing = [t for t in TRIGGERS if t not in state]
        # 'O' fires in normal sessions, 'A' always; 'D' is disabled, 'R' replica-only.
        disabled = [t for t in TRIGGERS if t in state and state[t] not in ("O", "A")]
        if missing:
            raise CheckFailed(
                f"missing on messages: {', '.join(missing)}",
                "the schema was changed by hand: restore the triggers of"
                " migrations/versions/ (0001_initial.py, 0007_dialog_state_per_statement.py)",
            )
        if disabled:
            raise CheckFailed(
                f"disabled on messages: {', '.join(disabled)}",
                "; ".join(f"ALTER TABLE messages ENABLE TRIGGER {t}" for t in disabled),
            )
        if source is None or f"'{CHANNEL}'" not in source[0]:
            raise CheckFailed(
                f"replyx_notify_message() does not notify channel {CHANNEL}",
                "restore it from migrations/versions/0001_initial.py",
            )
        return f"{', '.join(TRIGGERS)} enabled; NOTIFY on channel {CHANNEL}"

    def check_notify(self) -> Iterator[Result]:
        """A NOTIFY on the real channel, seen by our own LISTEN and counted by the gateway."""
        counted_before = [self._gateway_notifications(base) for _, base in self.gateways]
        marker = secrets.token_hex(8)
        # A typing event for a dialog that does not exist: valid, so the gateway parses and
        # counts it without a warning, and routed to no socket.
        payload = orjson.dumps(
            {"type": "typing", "dialog_id": NOWHERE, "sender": "system", "check": marker}
        ).decode()
        try:
            with self._connect_listen() as listen, self._connect() as sender:
                listen.execute(f"LISTEN {CHANNEL}")
                started = time.monotonic()
                sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                sender.commit()
                seen = False
                deadline = started + self.timeout
                while not seen and time.monotonic() < deadline:
                    wait = max(0.01, deadline - time.monotonic())
                    for note in listen.notifies(timeout=wait):
                        if marker in note.payload:
                            seen = True
                            break
                took = time.monotonic() - started
                listeners = listen.execute(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = %s",
                    (LISTENER_APP,),
                ).fetchall()
        except Exception as exc:
            yield Result("listen/notify", FAIL, f"{type(exc).__name__}: {short(exc)}")
            yield Result("gateway listener", SKIP, "skipped: the round trip failed")
            return
        if seen:
            yield Result("listen/notify", PASS,
                         f"LISTEN {CHANNEL} got our NOTIFY in {took * 1000:.0f} ms")
        else:
            yield Result(
                "listen/notify", FAIL,
                f"our NOTIFY did not arrive within {self.timeout:g}s on {self._listen_where()}",
                "LISTEN/NOTIFY needs a direct session: a transaction-pooling pgbouncer hands"
                " each transaction another server connection, so notifications never reach"
                " the listener. Point REPLYX_LISTEN_DATABASE_URL straight at Postgres.",
            )
        yield from self._one(
            "gateway listener",
            lambda: self._check_listener([pid for (pid,) in listeners], counted_before),
        )

    def _connect_listen(self) -> Any:
        """The LISTEN side of the round trip: on the gateway's LISTEN URL, as it listens."""
        listen_url = self.settings.listen_database_url
        if listen_url is None:
            return self._connect(autocommit=True)
        return psycopg.connect(libpq_url(listen_url), connect_timeout=max(1, int(self.timeout)),
                               application_name="replyx-check", autocommit=True)

    def _listen_where(self) -> str:
        url = self.settings.listen_database_url
        where = "REPLYX_LISTEN_DATABASE_URL" if url else "DATABASE_URL"
        port = urlsplit(url or self.url or "").port
        # 6432 is pgbouncer's default port: say so, it is the usual cause.
        return f"{where} (port {port}: pgbouncer's default)" if port == 6432 else where

    def _check_listener(self, pids: list[int], counted_before: list[float | None]) -> str:
        expected = len(self.gateways)
        hint = (f"start the gateway: `replyx ctl start gateway`; its log:"
                f" {self.log_dir}/gateway.log")
        if not pids:
            raise CheckFailed(f"no {LISTENER_APP} session in pg_stat_activity", hint)
        if len(pids) < expected:
            raise CheckFailed(
                f"{len(pids)} {LISTENER_APP} session(s) for REPLYX_GATEWAYS={expected}",
                f"each gateway holds one: `replyx ctl status`; logs: {self.log_dir}/gateway-*.log")
        if expected == 1 and len(pids) > 1:
            raise CheckFailed(
                f"{len(pids)} LISTEN sessions (backend pids {', '.join(map(str, pids))}):"
                " more than one gateway runs on this database",
                "run exactly one gateway process, or set REPLYX_GATEWAYS (on other hosts:"
                " REPLYX_GATEWAY_NAME) so that each is expected",
            )
        # Any notification counts: under traffic ours is one of many, and that is fine.
        waiting = {name for (name, _), before in zip(self.gateways, counted_before, strict=True)}
        deadline = time.monotonic() + self.timeout
        while True:
            for (name, base), before in zip(self.gateways, counted_before, strict=True):
                if name in waiting:
                    if before is None:
                        raise CheckFailed(f"{len(pids)} LISTEN session(s), but {name}"
                                          f" ({base}/metrics) does not answer",
                                          hint.replace("gateway", name))
                    counted = self._gateway_notifications(base)
                    if counted is not None and counted > before:
                        waiting.discard(name)
            if not waiting:
                break
            if time.monotonic() > deadline:
                name = sorted(waiting)[0]
                raise CheckFailed(
                    f"{', '.join(sorted(waiting))} counted no notification within"
                    f" {self.timeout:g}s ({len(pids)} LISTEN session(s))",
                    f"see {self.log_dir}/{name}.log and GET"
                    f" {dict(self.gateways)[name]}/health",
                )
            time.sleep(0.1)
        if expected == 1 and len(pids) == 1:
            return f"one LISTEN session (backend pid {pids[0]}); the gateway received our NOTIFY"
        elsewhere = len(pids) - expected
        return (f"{len(pids)} LISTEN sessions (backend pids {', '.join(map(str, pids))})"
                + (f", {elsewhere} not of this host's gateways" if elsewhere else "")
                + f"; all {expected} gateways received our NOTIFY")

    def _gateway_notifications(self, base: str) -> float | None:
        try:
            _, _, body = self._get(base + "/metrics")
        except OSError:
            return None
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "replyx_notifications_total":
                    return sample.value
        return None
