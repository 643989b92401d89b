#!/usr/bin/env python3
"""Many sessions of one user at once: each gets a clear answer, other users are still served.

Starts one real Dovecot (its ``mail_max_userip_connections`` set by --userip, Dovecot's
default 10) and the proxy in front of it with the per-address and per-user limits raised
to --clients (so that the sessions reach Dovecot), then opens --clients connections of
alice at once (threads): each LOGIN, SELECT INBOX, NOOP, LOGOUT, with a socket timeout of
--timeout seconds (a timeout is a hang). Meanwhile bob, logged in before, sends NOOPs
in a loop: his slowest answer shows whether the proxy stayed responsive. Prints the
answers by kind, the slowest alice session, bob's slowest NOOP, and the proxy's CPU
seconds and peak RSS (psutil). See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BACKEND_HOST, PROXY_HOST, Dovecot, ProxyProcess, dovecot_available, log, make_root  # noqa: E402


def session(port: int, user: str, password: str, timeout: float) -> tuple[str, float]:
    t0 = time.monotonic()
    stage = "connect"
    try:
        s = socket.create_connection((PROXY_HOST, port), timeout=timeout)
        f = s.makefile("rb")
        greeting = f.readline()
        if not greeting.startswith(b"* OK"):
            return "greeting " + greeting[:60].decode(errors="replace").strip(), time.monotonic() - t0
        out = "?"
        stage = "greeting"
        for tag, cmd in ((b"a", b"LOGIN %s %s" % (user.encode(), password.encode())), (b"b", b"SELECT INBOX"),
                         (b"c", b"NOOP"), (b"d", b"LOGOUT")):
            stage = cmd.split()[0].decode()
            s.sendall(tag + b" " + cmd + b"\r\n")
            while True:
                line = f.readline()
                if not line:
                    return f"closed after {cmd.split()[0].decode()}", time.monotonic() - t0
                if line.startswith(tag + b" "):
                    break
            if not line.startswith(tag + b" OK"):
                return f"{cmd.split()[0].decode()}: " + line[2:70].decode(errors="replace").strip(), time.monotonic() - t0
            out = "ok"
        s.close()
        return out, time.monotonic() - t0
    except TimeoutError:
        return f"TIMEOUT (hang) at {stage}", time.monotonic() - t0
    except OSError as e:
        return f"error {e.__class__.__name__}", time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--userip", type=int, default=10, help="Dovecot's mail_max_userip_connections (10)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--keep", action="store_true", help="keep the directory (logs)")
    args = ap.parse_args()
    reason = dovecot_available()
    if reason is not None:
        sys.exit(f"bench_sessions: cannot run Dovecot here: {reason}")
    root = make_root("rp-sessions-")
    d = Dovecot("sessions", BACKEND_HOST, root / "b1",
                extra_config=f"protocol imap {{\n  mail_max_userip_connections = {args.userip}\n}}\n")
    d.start()
    (root / "proxy").mkdir()
    n = args.clients
    proxy = ProxyProcess(root / "proxy", d, proxy_extra=(f"max_connections_per_ip = {n + 10}\n"
                                                         f"max_unauthenticated_per_ip = {n + 10}\n"
                                                         f"max_connections_per_user = {n + 10}\n"))
    proxy.start()
    try:
        assert proxy.pid is not None
        ps = psutil.Process(proxy.pid)
        stop = threading.Event()
        bob: list[float] = []

        def bob_loop() -> None:
            s = socket.create_connection((PROXY_HOST, proxy.port), timeout=args.timeout)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"a LOGIN bob %s\r\n" % d.password("bob").encode())
            while not f.readline().startswith(b"a "):
                pass
            i = 0
            while not stop.is_set():
                i += 1
                t = time.monotonic()
                s.sendall(b"n%d NOOP\r\n" % i)
                while not f.readline().startswith(b"n%d " % i):
                    pass
                bob.append(time.monotonic() - t)
                time.sleep(0.02)
            s.close()

        cpu0 = sum(ps.cpu_times()[:2])
        peak = ps.memory_info().rss
        bt = threading.Thread(target=bob_loop, daemon=True)
        bt.start()
        time.sleep(0.3)
        results: list[tuple[str, float]] = []
        lock = threading.Lock()

        def one() -> None:
            r = session(proxy.port, "alice", d.password("alice"), args.timeout)
            with lock:
                results.append(r)

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, ps.memory_info().rss)
            time.sleep(0.05)
        wall = time.monotonic() - t0
        stop.set()
        bt.join(args.timeout)
        kinds = collections.Counter(k for k, _ in results)
        out = {"clients": n, "userip": args.userip, "wall": round(wall, 2), "answers": dict(kinds),
               "slowest_session": round(max(s for _, s in results), 2),
               "bob_noops": len(bob), "bob_slowest_noop": round(max(bob, default=0), 3),
               "proxy_cpu": round(sum(ps.cpu_times()[:2]) - cpu0, 2), "proxy_peak_rss_mb": round(peak / 2**20, 1)}
        print(json.dumps(out))
    finally:
        proxy.stop()
        d.stop()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
