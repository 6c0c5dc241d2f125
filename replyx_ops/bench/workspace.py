"""``replyx bench-workspace``: the operator's workspace (inbox) and presence churn under load.

One backend and one gateway (started as ``replyx bench`` starts them), a team
per assistant: ``--operators`` operators spread over ``--assistants``
assistants (``assistant_operators``), ``--dialogs`` dialogs. Messages are POSTed
to the backend's site API at ``--rate`` for ``--duration`` seconds in each phase;
every latency is "frame read at the socket - POST start".

1. **dialogs only** — an admin socket on each of the first ``--admin-sockets``
   dialogs: the dialog-socket latency, and the gateway's CPU per message
   without inboxes.
2. **inbox** — plus one open ``/ws/inbox`` per operator: the inbox ``dialog``
   frame latency at every inbox of the dialog's assistant, frames lost (a
   forward ``dialog`` frame missing at an inbox that should get it), the
   dialog-socket latency in the same run, the gateway's CPU per message.
3. **steady** — plus ``--sockets`` sockets (widget sockets on churn dialogs,
   site sockets on the rest): the baseline of phase 4.
4. **churn** — the same, while ``--churn`` times a second a widget socket
   closes and a widget socket opens on another dialog (its visitor was away
   longer than the presence debounce, so each is a real online/offline change):
   the gateway's CPU share, the Postgres statements per second presence causes
   and the dialog p99, against phase 3.
5. **churn, another tab open** — the control of phase 4: a second, steady widget
   socket on every churn dialog, then the same churn. The same handshakes, closes
   and socket bookkeeping, but no visitor goes online or offline, so presence has
   nothing to publish: phase 4's CPU minus this one's is what presence adds.

Postgres statements are counted with ``pg_stat_statements`` when the server
has it loaded (calls of presence statements); otherwise from
``pg_stat_database.xact_commit`` (the churn phase's transactions/s minus the
steady phase's) and ``pg_stat_user_tables`` on the presence tables (rows
written and scans per second). ``method`` in the result says which.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from replyx import security
from replyx.settings import Settings
from replyx_ops.bench.inboxload import Spec, WorkspacePool
from replyx_ops.bench.load import Process, poster_main
from replyx_ops.bench.measure import Progress, free_port, machine_info, percentiles
from replyx_ops.bench.phases import Phases
from replyx_ops.bench.profiles import RESULTS, Workload
from replyx_ops.bench.servers import BenchDatabase, start_backend, start_gateway
from replyx_ops.bench.stages import gc_pauses, scrape
from replyx_ops.bench.workspace_report import pg_counters, pg_rates, save, summarise, table

__all__ = ["add_arguments", "main"]

ORIGIN = "https://bench.example"
DEBOUNCE_S = 5.0  # the gateway's presence debounce: a visitor away longer really left


@dataclass(frozen=True)
class Scenario:
    operators: int = 200
    assistants: int = 20
    dialogs: int = 2000
    rate: float = 200.0
    duration: float = 30.0
    warmup: float = 3.0
    admin_sockets: int = 2000
    sockets: int = 2000
    churn: float = 100.0
    load_workers: int = 2
    #: Before and after each phase: the servers' statistics of what came before are flushed.
    pause: float = 1.0


PROFILES = {
    "full": Scenario(),
    "quick": Scenario(duration=10.0),
    "tiny": Scenario(operators=20, assistants=4, dialogs=100, rate=20.0, duration=1.5,
                     warmup=0.5, admin_sockets=100, sockets=100, churn=20.0, pause=0.3),
}


class Team:
    """``assistants`` assistants with their operators, dialogs and credentials."""

    def __init__(self, db: BenchDatabase, secret: bytes, scenario: Scenario) -> None:
        s = scenario
        self.site_tokens = [security.new_site_token() for _ in range(s.assistants)]
        # Widget dialogs for the churn: those open, and spares away for > the debounce.
        self.churn_on = min(s.sockets, round(4 * s.churn))
        churn_dialogs = self.churn_on + round(s.churn * (DEBOUNCE_S + 3))
        guest = [security.new_guest_token() for _ in range(churn_dialogs)]
        dummy_hash = "bench-no-login"
        with db.connect() as conn:
            users = _ids(conn, "INSERT INTO users (email, password_hash)"
                         " SELECT 'op' || i || '@bench.invalid', %s"
                         " FROM generate_series(1, %s) i ORDER BY i RETURNING id",
                         (dummy_hash, s.operators))
            self.assistants = _ids(
                conn, "INSERT INTO assistants (user_id, name, domains, site_token_hash)"
                " SELECT u, 'Bench ' || u, %s, h FROM unnest(%s::bigint[], %s::text[])"
                " WITH ORDINALITY AS t(u, h, n) ORDER BY n RETURNING id",
                ([ORIGIN], users[: s.assistants],
                 [security.token_hash(t) for t in self.site_tokens]))
            # Operator i works on assistant i mod K (the owners are operators already).
            self.assistant_of_user = {u: self.assistants[i % s.assistants]
                                      for i, u in enumerate(users)}
            conn.execute("INSERT INTO assistant_operators (assistant_id, user_id)"
                         " SELECT a, u FROM unnest(%s::bigint[], %s::bigint[]) t(a, u)"
                         " ON CONFLICT DO NOTHING",
                         (list(self.assistant_of_user.values()), users))
            owners = [self.assistants[i % s.assistants] for i in range(s.dialogs)]
            self.dialogs = _ids(conn, "INSERT INTO dialogs (assistant_id, channel)"
                                " SELECT a, 'site' FROM unnest(%s::bigint[]) WITH ORDINALITY"
                                " t(a, n) ORDER BY n RETURNING id", (owners,))
            churn_owners = [self.assistants[i % s.assistants] for i in range(churn_dialogs)]
            self.widgets = _ids(
                conn, "INSERT INTO dialogs (assistant_id, channel, guest_token_hash)"
                " SELECT a, 'widget', h FROM unnest(%s::bigint[], %s::text[])"
                " WITH ORDINALITY t(a, h, n) ORDER BY n RETURNING id",
                (churn_owners, [security.token_hash(t) for t in guest]))
        self.owner = dict(zip(self.dialogs, owners, strict=True))
        self.widget_owner = dict(zip(self.widgets, churn_owners, strict=True))
        self.guest = dict(zip(self.widgets, guest, strict=True))
        self.site_token = dict(zip(self.assistants, self.site_tokens, strict=True))
        self.tokens = {u: security.issue_operator_token(u, secret, 7 * 86400) for u in users}
        self.owner_token = {a: self.tokens[users[i]] for i, a in enumerate(self.assistants)}

    def admin(self, dialog_id: int) -> Spec:
        token = self.owner_token[self.owner[dialog_id]]
        return (dialog_id, f"/ws/dialogs/{dialog_id}?token={token}", None)

    def site(self, dialog_id: int) -> Spec:
        token = self.site_token[self.owner[dialog_id]]
        return (dialog_id, f"/ws/site/dialogs/{dialog_id}?site_token={token}", None)

    def widget(self, dialog_id: int) -> Spec:
        return (dialog_id, f"/ws/widget/dialogs/{dialog_id}?assistant_id="
                f"{self.widget_owner[dialog_id]}&guest_token={self.guest[dialog_id]}", ORIGIN)

    def inboxes(self) -> list[Spec]:
        return [(a, f"/ws/inbox?token={self.tokens[u]}", None)
                for u, a in self.assistant_of_user.items()]

    def post_path(self, dialog_id: int) -> str:
        token = self.site_token[self.owner[dialog_id]]
        return f"/api/site/dialogs/{dialog_id}/messages?site_token={token}"


def _ids(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> list[int]:
    return [int(row[0]) for row in conn.execute(sql, params).fetchall()]


class WorkspaceBench(Phases):
    def __init__(self, settings: Settings, scenario: Scenario, progress: Progress,
                 keep_database: bool) -> None:
        super().__init__(settings, Workload(load_workers=scenario.load_workers), progress,
                         None, keep_database)
        self.scenario = scenario
        self.wpool: WorkspacePool | None = None

    def run(self) -> dict[str, Any]:
        s, say = self.scenario, self.progress
        load_before = os.getloadavg()
        say(f"scenario: {asdict(s)}")
        self.db = BenchDatabase(self.settings.database_url, self.settings.data_dir)
        team = self.team = Team(self.db, self.jwt_secret.encode(), s)
        say(f"database {self.db.name}: {len(team.assistants)} assistants,"
            f" {s.operators} operators, {len(team.dialogs)} dialogs"
            f" (+{len(team.widgets)} churn widget dialogs)")
        log_dir = self.run_dir / "log"
        backend_port, gateway_port = free_port(), free_port()
        self.backend_port = backend_port
        self.start(start_backend, self.env(), backend_port, log_dir)
        self.gateway = self.start(start_gateway, self.env(), gateway_port, log_dir)
        self.gateway_metrics = f"http://127.0.0.1:{gateway_port}/metrics"
        self.pool = self.wpool = WorkspacePool(s.load_workers, "127.0.0.1", gateway_port)
        self.poster = Process(poster_main)

        admins = [team.admin(d) for d in team.dialogs[: s.admin_sockets]]
        self.open("admin", admins)
        say(f"  warm-up {s.warmup:.0f}s at {s.rate:.0f} msg/s")
        self.post(s.warmup)
        self.pool.settle(["admin"], self.last_seqs(), 30)
        phases: dict[str, Any] = {}
        say("phase 1, dialogs only")
        phases["dialogs_only"] = self.phase(inbox=False, churn=False)
        opened = self.wpool.open_inboxes(team.inboxes())
        say(f"  {opened['opened']} inbox sockets open in {opened['seconds']:.1f}s")
        say("phase 2, inbox")
        phases["inbox"] = self.phase(inbox=True, churn=False)
        on = [team.widget(d) for d in team.widgets[: team.churn_on]]
        spare = [team.widget(d) for d in team.widgets[team.churn_on:]]
        widgets = self.wpool.open_churn(on, spare)
        crowd = [team.site(d) for d in team.dialogs[: max(0, s.sockets - widgets)]]
        if crowd:
            self.open("crowd", crowd)
        say(f"  {widgets + len(crowd)} sockets open ({widgets} widget, {len(crowd)} site);"
            f" {len(spare)} spare widget dialogs for the churn")
        time.sleep(DEBOUNCE_S + 1)  # presence of the new sockets published and settled
        say("phase 3, steady (no churn)")
        phases["steady"] = self.phase(inbox=True, churn=False)
        say(f"phase 4, churn {s.churn:.0f}/s")
        phases["churn"] = self.phase(inbox=True, churn=True)
        # The control: another tab stays open on every churn dialog, so the same
        # connects and disconnects change no one's presence (nothing to publish).
        self.open("tabs", [team.widget(d) for d in team.widgets])
        time.sleep(DEBOUNCE_S + 1)
        say(f"phase 5, churn {s.churn:.0f}/s with another tab open (no presence change)")
        phases["churn_tabs"] = self.phase(inbox=True, churn=True)
        phases["sockets"] = widgets + len(crowd)
        result = summarise(phases, asdict(s))
        result["machine"] = machine_info(self.db.version(), load_before, os.getloadavg())
        return result

    def last_seqs(self) -> dict[int, int]:
        assert self.db is not None
        with self.db.connect() as conn:
            rows = conn.execute("SELECT id, last_seq FROM dialogs WHERE id = ANY(%s)",
                                (self.team.dialogs,)).fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    def post(self, seconds: float) -> dict[str, Any]:
        assert self.poster is not None
        paths = [self.team.post_path(d) for d in self.team.dialogs]
        return self.poster.call("post", host="127.0.0.1", port=self.backend_port, paths=paths,
                                rate=self.scenario.rate, duration=seconds)

    def phase(self, *, inbox: bool, churn: bool) -> dict[str, Any]:
        assert self.wpool is not None and self.db is not None
        s, say, pool = self.scenario, self.progress, self.wpool
        baseline = self.last_seqs()
        pool.record(True)
        if inbox:
            pool.all("inbox_record", on=True, baseline=baseline)
        time.sleep(s.pause)  # the servers' statistics of what came before are flushed
        counters_before, started = pg_counters(self.db), time.monotonic()
        cpu_before = self.gateway.cpu_seconds()
        gc_before = scrape(self.gateway_metrics)
        if churn:
            pool.start_churn(s.churn, s.duration)
        posted = self.post(s.duration)
        churned = pool.churn_done() if churn else None
        expected = self.last_seqs()
        settled = pool.settle(["admin"], expected, 60)
        inboxes = (pool.inbox_settle(expected, baseline, self.team.owner, 60)
                   if inbox else None)
        cpu = self.gateway.cpu_seconds() - cpu_before
        gc = gc_pauses(gc_before, scrape(self.gateway_metrics))
        time.sleep(s.pause)
        seconds = time.monotonic() - started
        pg = pg_rates(counters_before, pg_counters(self.db), seconds)
        pool.record(False)
        bad = sum(v for k, v in posted["statuses"].items() if k != "201") + len(posted["errors"])
        out: dict[str, Any] = {
            "rate_msgs_per_s": round(posted["rate"], 1),
            "messages": posted["sent"],
            "http_errors": bad,
            "dialog_sockets": settled["sockets"],
            "dialog_latency_ms": percentiles(settled["latencies_ms"]),
            "dialog_arrival_ms": percentiles(settled["arrival_ms"]),
            "dialog_lost": settled["lost"] + settled["gaps"],
            "gateway_cpu_s": round(cpu, 3),
            "gateway_cpu_ms_per_msg": round(1000 * cpu / max(1, posted["sent"]), 3),
            "gateway_cpu_share": round(cpu / seconds, 3),
            "seconds": round(seconds, 2),
            "pg": pg,
            "gateway_gc": gc,
        }
        if inboxes is not None:
            out["inbox"] = {
                "sockets": inboxes["sockets"], "frames": inboxes["frames"],
                "lost": inboxes["lost"], "gaps": inboxes["gaps"], "closed": inboxes["closed"],
                "latency_ms": percentiles(inboxes["latencies_ms"]),
                "arrival_ms": percentiles(inboxes["arrival_ms"]),
                "from_insert_ms": percentiles(inboxes["from_insert_ms"]),
            }
        if churned is not None:
            out["churn"] = churned
        say(f"  dialog ms {out['dialog_latency_ms']} (arrival {out['dialog_arrival_ms']}),"
            f" lost {out['dialog_lost']},"
            f" gateway CPU {out['gateway_cpu_ms_per_msg']} ms/msg"
            f" ({out['gateway_cpu_share']:.0%}), gc {gc}, pg {pg}")
        if inboxes is not None:
            say(f"  inbox ms {out['inbox']['latency_ms']} (arrival {out['inbox']['arrival_ms']}),"
                f" frames {inboxes['frames']},"
                f" lost {inboxes['lost']}")
        if churned is not None:
            say(f"  churn {churned}")
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="profile", const="quick",
                      help="10 s phases")
    size.add_argument("--tiny", action="store_const", dest="profile", const="tiny",
                      help="a smoke run of under a minute (the test suite's)")
    parser.set_defaults(profile="full")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on the last line of stdout")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help=f"where workspace-<date>.json goes (default {RESULTS})")
    parser.add_argument("--keep-database", action="store_true",
                        help="leave the replyx_bench_<hex> database in place afterwards")
    for name, kind in (("operators", int), ("assistants", int), ("dialogs", int),
                       ("rate", float), ("duration", float), ("admin-sockets", int),
                       ("sockets", int), ("churn", float), ("load-workers", int)):
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=f"override the profile's {name.replace('-', ' ')}")


def scenario_from(args: argparse.Namespace) -> Scenario:
    overrides = {f: getattr(args, f) for f in (
        "operators", "assistants", "dialogs", "rate", "duration", "admin_sockets", "sockets",
        "churn", "load_workers") if getattr(args, f, None) is not None}
    return replace(PROFILES[args.profile], **overrides)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwind through Phases.running() to stop the servers


def main(settings: Settings, args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    progress = Progress()
    bench = WorkspaceBench(settings, scenario_from(args), progress, args.keep_database)
    with bench.running():
        result = bench.run()
    progress(f"done in {time.monotonic() - progress.started:.0f}s")
    path = save(result, args.output)
    print(table(result))
    print(f"written: {path}")
    if args.json:
        print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="replyx bench-workspace")
    add_arguments(_parser)
    sys.exit(main(Settings.from_environ(), _parser.parse_args()))
