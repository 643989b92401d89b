#!/usr/bin/env python3
"""Hostile clients against the proxy, on loopback only, bounded in count and time.

For each kind of abuse (``referral_proxy/testing/hostile.py``: idle connections before
and after login, clients that pipeline and never read, literal floods, commands held
just under their limits, slowloris, failed-login floods) a fresh proxy is started in
front of one real Dovecot; N connections of that kind are opened from ten source
addresses (127.0.1.x) and driven until the proxy stops reading them; then the proxy's
memory is read from /proc (RSS now and at its peak, less the quiet proxy's) and divided
by the connections, while a legitimate client (127.0.0.1, logged in beforehand) times
its NOOP round trip and a fresh LOGIN beside the quiet baseline.

Memory is measured with the connection limits raised out of the way (what one connection
can cost); ``--defaults`` runs the same kinds under the default limits instead (what
gets in at all, and whether the legitimate client is still served).

    python bench/abuse.py                       # every kind, 200 connections each (~3 min)
    python bench/abuse.py --kinds pipeline-pre,slowloris --connections 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PROXY_HOST,
    USER,
    Harness,
    ProxyProcess,
    RawIMAP,
    dovecot_available,
    install_signal_handlers,
    log,
    render_table,
    run_cli,
    suspicious_lines,
)

from referral_proxy.testing.hostile import KINDS, Crowd, source_addresses  # noqa: E402
from referral_proxy.testing.procmem import reset_peak, rss  # noqa: E402

RAISED = """max_connections = 100000
max_connections_per_ip = 100000
max_unauthenticated_per_ip = 100000
max_connections_per_user = 100000
login_timeout = 600
"""


def noop_rtts(client: RawIMAP, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.command(b"NOOP")
        out.append(time.perf_counter() - t0)
    return out


def login_time(port: int, password: str, timeout: float) -> float | str:
    """Seconds from connect to a tagged OK of LOGIN, or what went wrong instead."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection((PROXY_HOST, port), timeout=timeout) as s:
            f = s.makefile("rb")
            greeting = f.readline()
            if not greeting.startswith(b"* OK"):
                return greeting.decode(errors="replace").strip()[:60]
            s.sendall(b"l LOGIN %s \"%s\"\r\n" % (USER.encode(), password.encode()))
            while not (line := f.readline()).startswith(b"l "):
                if not line:
                    return "closed"
            if not line.startswith(b"l OK"):
                return line.decode(errors="replace").strip()[:60]
            s.sendall(b"z LOGOUT\r\n")
    except OSError as e:
        return type(e).__name__
    return time.perf_counter() - t0


def drive(kind: str, port: int, count: int, sources: list[str], password: str, conn) -> None:
    """The child process: open the crowd, push it until the proxy stops reading, report,
    then keep it busy until told to stop."""
    crowd = Crowd(KINDS[kind], PROXY_HOST, port, count, sources, password=password)
    blocked = crowd.push_until_blocked(most=60.0) if KINDS[kind].stream and not KINDS[kind].reads else None
    accepted = crowd.accepted
    closed = sum(1 for m in accepted if not m.alive())
    conn.send({
        "closed": closed,
        "accepted": len(accepted),
        "refused": len(crowd.refusals),
        "refusal": crowd.refusals[0].decode(errors="replace").strip() if crowd.refusals else "",
        "errors": crowd.errors[:3],
        "stopped_reading": blocked,
        "pushed_per_conn": (sum(m.sent for m in accepted) / len(accepted)) if accepted else 0,
    })
    while not conn.poll(0):
        crowd.keep_busy(0.5)
    alive = sum(1 for m in accepted if m.alive())
    conn.send({"alive": alive})
    crowd.close()


def run_kind(h: Harness, kind: str, args: argparse.Namespace, password: str) -> dict:
    workdir = h.root / f"proxy-{kind}"
    workdir.mkdir()
    extra = ("" if args.defaults else RAISED) + "".join(f"{line}\n" for line in args.set)
    if kind != "login-flood":
        extra += "login_penalty = 0\n" if not args.defaults else ""
    proxy = ProxyProcess(workdir, h.dovecots, proxy_extra=extra)
    proxy.start()
    try:
        pid = proxy.pid
        assert pid is not None
        legit = RawIMAP(PROXY_HOST, proxy.port, "legit")
        legit.login(USER, password)
        quiet_noop = statistics.median(noop_rtts(legit, args.noops))
        quiet_login = statistics.median([t for t in (login_time(proxy.port, password, 30) for _ in range(5))
                                         if isinstance(t, float)] or [float("nan")])
        time.sleep(0.5)
        base, _ = rss(pid)
        reset_peak(pid)
        parent, child = multiprocessing.Pipe()
        worker = multiprocessing.Process(target=drive, args=(kind, proxy.port, args.connections,
                                                             source_addresses(10), password, child))
        worker.start()
        if not parent.poll(180):
            raise RuntimeError(f"{kind}: the hostile clients did not report within 180 s")
        report = parent.recv()
        time.sleep(args.hold)
        now, peak = rss(pid)
        noop = noop_rtts(legit, args.noops)
        logins = [login_time(proxy.port, password, 30) for _ in range(5)]
        timed = [t for t in logins if isinstance(t, float)]
        parent.send("stop")
        report.update(parent.recv() if parent.poll(60) else {"alive": None})
        worker.join(30)
        if worker.is_alive():
            worker.kill()
        legit.close()
        n = max(1, report["accepted"])
        return {
            "kind": kind, "connections": args.connections, **report,
            "rss_base_mb": base / 1e6, "rss_mb": now / 1e6, "peak_mb": peak / 1e6,
            "kb_per_conn": (now - base) / n / 1024, "peak_kb_per_conn": (peak - base) / n / 1024,
            "noop_quiet_ms": quiet_noop * 1e3, "noop_ms": statistics.median(noop) * 1e3,
            "login_quiet_ms": quiet_login * 1e3,
            "login_ms": statistics.median(timed) * 1e3 if timed else None,
            "login_failures": [t for t in logins if not isinstance(t, float)],
            "suspicious": suspicious_lines(proxy.stderr_text())[:5],
        }
    finally:
        proxy.stop()


def _then(r: dict) -> str:
    """What the proxy did with the crowd: closed it, stopped reading it, or neither."""
    if r["accepted"] and r["closed"] == r["accepted"]:
        return "closed"
    return {True: "not read", False: "READ ON", None: "-"}[r["stopped_reading"]]


def table(results: list[dict]) -> str:
    head = ["kind", "accepted", "pushed/conn", "then", "RSS/conn", "peak/conn", "NOOP quiet -> now",
            "LOGIN quiet -> now"]
    rows = []
    for r in results:
        login = f"{r['login_ms']:.1f} ms" if r["login_ms"] is not None else "; ".join(r["login_failures"])[:40]
        rows.append([
            r["kind"], f"{r['accepted']}/{r['connections']}", f"{r['pushed_per_conn'] / 1024:.0f} KiB",
            _then(r),
            f"{r['kb_per_conn']:.1f} KiB", f"{r['peak_kb_per_conn']:.1f} KiB",
            f"{r['noop_quiet_ms']:.2f} -> {r['noop_ms']:.2f} ms", f"{r['login_quiet_ms']:.1f} -> {login}",
        ])
    return "\n".join(render_table(head, rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of: " + ", ".join(KINDS))
    ap.add_argument("--connections", type=int, default=200, help="hostile connections per kind (at most 2000)")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds the crowd is held before measuring")
    ap.add_argument("--noops", type=int, default=200, help="NOOP round trips per latency sample")
    ap.add_argument("--defaults", action="store_true", help="the default connection limits instead of raised ones")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a [proxy] line for every proxy, e.g. --set max_commands_in_flight=16")
    ap.add_argument("--json", help="also write every number to this file")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s): {', '.join(unknown)}")
    if not 1 <= args.connections <= 2000:
        ap.error("--connections: 1 to 2000 (loopback, bounded)")
    reason = dovecot_available()
    if reason is not None:
        print(f"abuse.py: needs Dovecot: {reason}", file=sys.stderr)
        return 2
    install_signal_handlers()
    results = []
    with Harness(keep=args.keep) as h:
        h.start()
        assert h.proxy is not None and h.dovecot is not None
        h.proxy.stop()  # each kind gets a fresh proxy of its own
        password = h.dovecot.password(USER)
        for kind in kinds:
            log(f"{kind}: {args.connections} connections ({KINDS[kind].what})")
            results.append(run_kind(h, kind, args, password))
            log(table(results[-1:]))
    print(f"\nreferral-proxy under abuse: {args.connections} hostile connections per kind, "
          f"{'default' if args.defaults else 'raised'} connection limits (pid {os.getpid()})\n")
    print(table(results))
    for r in results:
        if r["suspicious"]:
            print(f"{r['kind']}: suspicious proxy log lines: {r['suspicious']}")
        if r["refusal"]:
            print(f"{r['kind']}: {r['refused']} refused, e.g. {r['refusal']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("abuse.py", main))
