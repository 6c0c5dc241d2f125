"""``replyx bench-hostile``: bystanders' latency while one address attacks within every limit.

The bystanders are the normal latency workload of ``replyx bench`` (sockets held by
:class:`~replyx_ops.bench.load.SocketPool`, messages POSTed by the poster process at a
steady rate, latency from the POST to the frame). They run twice: quiet, then while an
attacker process, from one client address (``X-Real-IP`` through a loopback proxy, as
every client behind nginx), runs each pattern of issue 16 at once:

* replay memory: a dialog filled with messages of 32,768 control characters (~196 KB
  frames each), then sockets with ``since=0`` that never read;
* failed handshakes: invalid UTF-8 query values, and random guest tokens, as fast as
  the limits let them through;
* sockets that never read but send unsolicited pongs; messages that never finish;
* a ping flood over many sockets, each under its own frame rate;
* RFC 6455 violations (unmasked frames, bad close codes, reserved opcodes).

The report (JSON on stdout, a table on stderr) gives the bystanders' p50/p99 quiet and
under attack, the gateway's peak RSS, and what was lost. Targets: p99 under attack at
most 2x quiet; peak RSS under ``RSS_BOUND_MIB`` (300 MiB at 2,000 bystander sockets);
nothing lost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import orjson

from replyx.settings import Settings
from replyx_ops.bench.load import Process, SocketPool, poster_main, serve_commands
from replyx_ops.bench.measure import free_port
from replyx_ops.bench.servers import (
    BenchDatabase,
    Server,
    Tenant,
    server_env,
    start_backend,
    start_gateway,
)

#: The gateway's peak RSS the run must stay under, in MiB.
RSS_BOUND_MIB = 300
ATTACKER = "203.0.113.66"
#: The attacker stays within the gateway's default limits (REPLYX_HANDSHAKE_RATE 10/s,
#: burst 60; REPLYX_ADDRESS_FRAME_RATE 200/s): a few handshakes are kept for headroom.
HANDSHAKE_HEADROOM = 50
#: The attack patterns, each of which ``--without`` can leave out.
PATTERNS = ("replay", "stalled", "flood", "handshakes")
TEXT, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x0, 0x8, 0x9, 0xA


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bystanders", type=int, default=2000,
                        help="bystander sockets (two per dialog; default 2000)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="bystander messages per second (default 50)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of each phase, quiet and under attack (default 20)")
    parser.add_argument("--tiny", action="store_true",
                        help="a small run that finishes within a minute (for the test suite)")
    parser.add_argument("--json", action="store_true", help="only the JSON report on stdout")
    parser.add_argument("--without", action="append", default=[], choices=PATTERNS,
                        help="leave a pattern out (repeatable), to see what each one costs")


# -- the attacker (a process of its own) ---------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame; clients must mask (RFC 6455 §5.3), attackers may not."""
    head = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", head, (0x80 if masked else 0) | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", head, (0x80 if masked else 0) | 126, length)
    else:
        header = struct.pack("!BBQ", head, (0x80 if masked else 0) | 127, length)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Attacker:
    """Runs every pattern from one address, counting what the gateway answered."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.outcomes: dict[str, int] = {}
        self.held: list[asyncio.StreamWriter] = []
        self.pongers: list[asyncio.StreamWriter] = []
        self.flooders: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    async def connect(self, path: str, origin: str | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), 5)
        except (OSError, TimeoutError):
            self.count("connect failed")
            return None
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
                 "Sec-WebSocket-Version: 13", f"X-Real-IP: {ATTACKER}"]
        if origin:
            lines.append(f"Origin: {origin}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            writer.close()
            self.count("no handshake")
            return None
        if not status.startswith(b"HTTP/1.1 101"):
            writer.close()
            self.count("http " + status[9:12].decode(errors="replace"))
            return None
        return reader, writer

    async def close_code(self, reader: asyncio.StreamReader, timeout: float = 10.0  # noqa: ASYNC109
                         ) -> int | None:
        """Read until the server's close frame; its code (None: the connection just ended)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    head, length = await reader.readexactly(2)
                    length &= 0x7F
                    if length == 126:
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                    elif length == 127:
                        (length,) = struct.unpack("!Q", await reader.readexactly(8))
                    payload = await reader.readexactly(length)
                    if head & 0x0F == CLOSE:
                        return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return None

    async def refused(self, path: str, origin: str | None = None) -> None:
        opened = await self.connect(path, origin)
        if opened is None:
            return
        reader, writer = opened
        self.count(f"closed {await self.close_code(reader)}")
        writer.close()

    async def hold(self, path: str, first: bytes = b"", origin: str | None = None) -> None:
        """A socket that never reads; ``first`` is sent once (a fragment, say)."""
        opened = await self.connect(path, origin)
        if opened is not None:
            opened[1].write(first)
            self.held.append(opened[1])

    async def paced(self, opens: list[Any], per_second: float) -> list[Any]:
        """Run ``opens`` (coroutines that each make one handshake) at the address's rate."""
        results = []
        for index, coro in enumerate(opens):
            results.append(await coro)
            if index + 1 >= HANDSHAKE_HEADROOM:
                await asyncio.sleep(1 / per_second)
        return results

    async def prepare(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Open the long-lived attacking sockets, within the handshake rate."""
        site = plan["site_path"]
        # One unfinished 60 KB message each (under the 64 KiB frame limit), then silence.
        fragment = frame(TEXT, b"[" * 60000, fin=False)
        rate = plan["handshakes_per_s"]
        await self.paced([self.hold(site, fragment) for _ in range(plan["stalled"])], rate)
        await self.paced([self.hold(site) for _ in range(plan["stalled"])], rate)
        self.pongers = self.held[-plan["stalled"]:] if plan["stalled"] else []
        self.flooders = [o for o in await self.paced(
            [self.connect(site) for _ in range(plan["flooders"])], rate) if o is not None]
        return {"held": len(self.held), "flooders": len(self.flooders)}

    async def attack(self, plan: dict[str, Any], seconds: float) -> dict[str, Any]:
        stop = time.monotonic() + seconds
        site, widget, origin = plan["site_path"], plan["widget_path"], plan["origin"]
        rate = plan["handshakes_per_s"]
        # Replay memory: since=0 readers of the huge dialog that never read.
        await self.paced([self.hold(plan["replay_path"], origin=origin)
                          for _ in range(plan["replayers"])], rate)
        pong = frame(PONG)
        ping = frame(TEXT, b'{"type":"ping"}')

        async def pongs() -> None:
            while time.monotonic() < stop:
                for writer in self.pongers:
                    if not writer.is_closing():
                        writer.write(pong)
                await asyncio.sleep(0.5)

        async def ping_flood() -> None:
            # The address's whole frame budget, spread over many sockets each under its own.
            per_socket = plan["frames_per_s"] / max(1, len(self.flooders))
            while self.flooders and time.monotonic() < stop:
                for _, writer in self.flooders:
                    if not writer.is_closing():
                        writer.write(ping)
                await asyncio.sleep(1 / per_socket)

        async def handshakes() -> None:
            # Refused handshakes at the address's handshake rate: invalid UTF-8 query values,
            # random guest tokens, and RFC 6455 violations on sockets that were let in.
            bad = [frame(TEXT, b"x", masked=False), frame(CLOSE, struct.pack("!H", 999)),
                   frame(0x3, b"x"), frame(PING, b"x" * 126), frame(TEXT, b"\xc3\x28")]
            shapes = [f"{site}&since=%ff", site.replace("site_token=", "site_token=%ff"),
                      f"{widget.split('&guest_token=')[0]}&guest_token=rxg_"]
            i = 0
            while time.monotonic() < stop:
                if i % 4 == 3:
                    opened = await self.connect(site)
                    if opened is not None:
                        opened[1].write(bad[i % len(bad)])
                        self.count(f"violation closed {await self.close_code(opened[0])}")
                        opened[1].close()
                else:
                    path = shapes[i % 3]
                    if path.endswith("rxg_"):
                        path += secrets.token_urlsafe(32)
                    await self.refused(path, origin)
                i += 1
                await asyncio.sleep(1 / rate)

        await asyncio.gather(pongs(), ping_flood(),
                             handshakes() if plan["handshakes"] else asyncio.sleep(seconds))
        for writer in self.held:
            writer.close()
        for _, writer in self.flooders:
            writer.close()
        self.held = []
        return {"outcomes": self.outcomes}


def attacker_main(conn: Connection, host: str, port: int) -> None:
    attacker = Attacker(host, port)
    serve_commands(conn, {"prepare": attacker.prepare, "attack": attacker.attack})


# -- the orchestrator ------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"n": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 2)}


class PeakRss:
    """Samples a server's RSS every 50 ms in a thread; ``peak`` in bytes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.server.rss_bytes())
            except Exception:  # the process is going away
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def fill_huge_dialog(tenant: Tenant, dialog_id: int, count: int) -> None:
    """What a visitor can post over time within the HTTP limits, written at once."""
    with tenant.db.connect() as conn:
        conn.execute("INSERT INTO messages (dialog_id, sender, text) SELECT %s, 'visitor',"
                     " repeat(chr(1), 32768) FROM generate_series(1, %s)", (dialog_id, count))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(settings: Settings, args: argparse.Namespace) -> int:
    tiny = bool(args.tiny)
    bystanders = 100 if tiny else args.bystanders
    rate = 20.0 if tiny else args.rate
    seconds = 6.0 if tiny else args.seconds
    plan = {"replayers": 2 if tiny else 4, "stalled": 10 if tiny else 50,
            "flooders": 20 if tiny else 100, "handshakes_per_s": 9.0, "frames_per_s": 190.0,
            "handshakes": "handshakes" not in args.without}
    for pattern, key in (("replay", "replayers"), ("stalled", "stalled"), ("flood", "flooders")):
        if pattern in args.without:
            plan[key] = 0
    run_dir = settings.data_dir / "bench" / f"hostile-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir = run_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    jwt_secret = secrets.token_urlsafe(48)
    db = BenchDatabase(settings.database_url, settings.data_dir)
    servers: list[Server] = []
    processes: list[Process] = []
    pool: SocketPool | None = None
    try:
        tenant = Tenant(db, jwt_secret.encode())
        dialogs = tenant.add_dialogs(bystanders // 2)
        huge = tenant.add_dialogs(1, widget_share=1.0)[0]
        fill_huge_dialog(tenant, huge, 100 if tiny else 500)
        env = server_env(db.url, run_dir, jwt_secret)
        backend_port, gateway_port = free_port(), free_port()
        servers.append(start_backend(env, backend_port, log_dir, workers=2 if tiny else 4))
        servers.append(gateway := start_gateway(env, gateway_port, log_dir))
        for server in servers:
            server.wait_healthy()
        pool = SocketPool(1 if tiny else 2, "127.0.0.1", gateway_port)
        poster = Process(poster_main)
        attacker = Process(attacker_main, "127.0.0.1", gateway_port)
        processes += [poster, attacker]
        specs = [spec for d in dialogs for spec in tenant.pair(d)]
        log(f"opening {len(specs)} bystander sockets")
        pool.open("bystanders", specs)
        paths = [tenant.post_path(d) for d in dialogs]
        rss = PeakRss(gateway)
        attack_plan = {
            **plan, "origin": Tenant.ORIGIN, "site_path": tenant.site_path(dialogs[1]),
            "widget_path": tenant.widget_path(huge),
            "replay_path": tenant.widget_path(huge) + "&since=0",
        }
        phases: dict[str, dict[str, Any]] = {}
        attack_report: dict[str, Any] = {}
        for phase in ("quiet", "attack"):
            log(f"{phase}: {rate:g} messages/s for {seconds:g}s")
            if phase == "attack":
                log(f"attacker prepares: {attacker.call('prepare', plan=attack_plan)}")
            pool.record(True)
            if phase == "attack":
                attacker.send("attack", plan=attack_plan, seconds=seconds + 2)
                time.sleep(1)  # the attack is under way before the measured messages
            posted = poster.call("post", host="127.0.0.1", port=backend_port, paths=paths,
                                 rate=rate, duration=seconds)
            if phase == "attack":
                attack_report = attacker.reply(timeout=seconds + 60)
            settled = pool.settle(["bystanders"], tenant.last_seqs(dialogs), timeout=30)
            pool.record(False)
            phases[phase] = {
                "latency_ms": percentiles(settled["latencies_ms"]),
                "lost": settled["lost"], "gaps": settled["gaps"],
                "duplicates": settled["duplicates"], "closed": settled["closed"],
                "posted": posted["sent"], "statuses": posted["statuses"],
            }
        peak = rss.stop()
        quiet, attack = phases["quiet"]["latency_ms"], phases["attack"]["latency_ms"]
        ratio = attack["p99"] / quiet["p99"] if quiet["p99"] else None
        lost = sum(p["lost"] + p["gaps"] + p["closed"] for p in phases.values())
        report = {
            "bystander_sockets": len(specs), "rate_msgs_per_s": rate, "seconds": seconds,
            "quiet": phases["quiet"], "attack": phases["attack"],
            "p99_ratio": round(ratio, 2) if ratio is not None else None,
            "gateway_peak_rss_mib": round(peak / (1 << 20), 1),
            "rss_bound_mib": RSS_BOUND_MIB, "lost": lost,
            "attacker": {**plan, **attack_report},
            "targets_met": {"p99_at_most_2x": ratio is not None and ratio <= 2.0,
                            "rss_under_bound": peak < RSS_BOUND_MIB << 20,
                            "nothing_lost": lost == 0},
        }
        if not args.json:
            log(f"{'':10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'n':>8}")
            for name in ("quiet", "attack"):
                lat = phases[name]["latency_ms"]
                log(f"{name:10}{lat['p50']:>10}{lat['p99']:>10}{lat['max']:>10}{lat['n']:>8}")
            log(f"p99 ratio {report['p99_ratio']}, gateway peak RSS"
                f" {report['gateway_peak_rss_mib']} MiB (bound {RSS_BOUND_MIB}), lost {lost}")
        print(orjson.dumps(report).decode(), flush=True)
        return 0
    finally:
        if pool is not None:
            pool.stop()
        for process in processes:
            process.stop()
        for server in reversed(servers):
            server.stop()
        db.drop()


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="replyx bench-hostile")
    add_arguments(cli)
    sys.exit(main(Settings.from_environ(), cli.parse_args()))
