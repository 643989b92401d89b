#!/usr/bin/env python3
"""One-by-one sync APPENDs: the CPU each side spends per message (client, proxy, Dovecot).

The path of a sync APPEND is serial (client -> proxy -> Dovecot -> proxy -> client), and on a
small VM the scheduler runs all three processes on ONE CPU (a waker's CPU takes the woken task:
``perf sched timehist`` shows it), so the rate is about 1 / (the sum of their CPU per message),
every microsecond of any side counting. This prints, per target, the rate and each side's CPU per
message from ``/proc/<pid>/schedstat`` (nanoseconds, user + system) with how many times it was
switched in per message (its wake-ups):

* ``direct``: bench_append's (c) client against Dovecot (``APPEND {n}``, ``+``, the message, OK);
* ``direct LITERAL+``: the client sends ``APPEND {n+}`` and the message at once, as the proxy sends
  them to Dovecot for a target known to take messages, and waits for the OK;
* ``direct LITERAL+, evict``: the same, the client reading and writing ``--evict`` MiB of memory
  after each OK (cache pollution between Dovecot's turns, as a proxy on the same CPU causes);
* ``proxy``: the (c) client through referral-proxy (this checkout, or ``--trees``).

    python bench/bench_append_sides.py --rounds 3 --messages 1000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import USER, install_signal_handlers, log, make_message  # noqa: E402
from bench_append import MAILBOX, AppendClient, Control, check_replies  # noqa: E402
from bench_peers import bench_root  # noqa: E402
from peers import ReferralProxyTarget, descendants, stop_all  # noqa: E402

from referral_proxy.fleet import Dovecot  # noqa: E402


def schedstat(pids: list[int]) -> tuple[int, int]:
    """(CPU nanoseconds, times switched in) of *pids* so far (their threads included)."""
    ns = runs = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                a, _wait, n = f.read().split()
        except OSError:
            continue
        ns, runs = ns + int(a), runs + int(n)
    return ns, runs


def imap_of(master: int) -> int | None:
    """The newest imap process of the Dovecot whose master is *master* (the last login's)."""
    out = subprocess.run(["pgrep", "-n", "-P", str(master), "-x", "imap"], capture_output=True, text=True).stdout
    return int(out) if out.strip() else None


def literal_plus(c: AppendClient, messages_crlf: list[bytes], evict: bytearray | None) -> tuple[int, list[bytes]]:
    replies = []
    sock, line_of = c.sock, c._line
    pages = len(evict[::4096]) if evict else 0
    t0 = time.perf_counter_ns()
    for msg in messages_crlf:
        tag = c.next_tag()
        sock.sendall(tag + b" APPEND " + MAILBOX + b" {%d+}\r\n" % (len(msg) - 2) + msg)
        while True:
            line = line_of()
            if line.startswith(tag + b" "):
                replies.append(line)
                break
        if evict:
            hashlib.md5(evict).digest()
            evict[::4096] = bytes(pages)
    return time.perf_counter_ns() - t0, replies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="", help="comma-separated checkouts for the proxy, '' = this one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=20480)
    ap.add_argument("--evict", type=int, default=1, help="MiB the evicting client touches after each OK (0: no such row)")
    args = ap.parse_args(argv)
    install_signal_handlers()
    root = bench_root()
    backend = Dovecot("sides", "127.0.0.2", root / "backend", users={USER: "secret"})
    trees = args.trees.split(",")
    targets: list[ReferralProxyTarget] = []
    names = ["direct", "direct LITERAL+"] + (["direct LITERAL+, evict"] if args.evict else []) + [
        f"proxy {t}" if t else "proxy" for t in trees]
    rows: dict[str, list[tuple[float, float, float, float, float, float, float]]] = {n: [] for n in names}
    saved_env = None
    try:
        backend.start()
        for i, tree in enumerate(trees):
            saved_env = os.environ.get("PYTHONPATH")
            if tree:
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, saved_env]))
            t = ReferralProxyTarget(root / f"p{i}", backend)
            t.start()
            targets.append(t)
            if saved_env is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved_env
        rng = random.Random(20240101)
        msgs = [make_message(i, args.size, rng) + b"\r\n" for i in range(1, args.messages + 1)]
        control = Control(backend.host, backend.port, "control")
        control.login(USER, backend.password(USER))
        evict = bytearray(args.evict << 20) if args.evict else None
        me = [int(p.name) for p in Path("/proc/self/task").iterdir()]
        for r in range(args.rounds):
            for j in range(len(names)):
                name = names[(j + r) % len(names)]
                proxy = targets[names.index(name) - (len(names) - len(trees))] if name.startswith("proxy") else None
                host, port = (proxy.host, proxy.port) if proxy else (backend.host, backend.port)
                c = AppendClient(host, port, name)
                c.login(USER, backend.password(USER))
                control.reset()
                c.command(b"NOOP")  # the proxy's backend connection (or Dovecot's imap process) is there now
                imap = imap_of(backend.pid or 0)
                proxy_pids = descendants(proxy.cpu_root) if proxy and proxy.cpu_root else []
                before = [schedstat(me), schedstat(proxy_pids), schedstat([imap] if imap else [])]
                if name == "direct" or proxy:
                    ns, replies, _ = c.synchronizing(msgs)
                else:
                    ns, replies = literal_plus(c, msgs, evict if name.endswith("evict") else None)
                after = [schedstat(me), schedstat(proxy_pids), schedstat([imap] if imap else [])]
                check_replies(name, "c", replies, args.messages)
                n = args.messages
                (c0, p0, d0), (c1, p1, d1) = before, after
                rows[name].append((n / ns * 1e9, (c1[0] - c0[0]) / n / 1e3, (p1[0] - p0[0]) / n / 1e3,
                                   (d1[0] - d0[0]) / n / 1e3, (c1[1] - c0[1]) / n, (p1[1] - p0[1]) / n,
                                   (d1[1] - d0[1]) / n))
                c.close()
                log(f"round {r + 1} {name}: {rows[name][-1][0]:.0f} msg/s, CPU us/msg client "
                    f"{rows[name][-1][1]:.0f} proxy {rows[name][-1][2]:.0f} Dovecot {rows[name][-1][3]:.0f}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(targets)
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)
    direct = statistics.median(row[0] for row in rows["direct"])
    print("| target | msg/s (x direct) | client CPU us/msg | proxy CPU us/msg | Dovecot (imap) CPU us/msg | "
          "sum of the three | switched in per msg: client / proxy / Dovecot |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        m = [statistics.median(row[k] for row in rows[name]) for k in range(7)]
        proxy_cells = f"{m[2]:.0f}" if name.startswith("proxy") else "-"
        print(f"| {name} | {m[0]:.0f} (x{m[0] / direct:.2f}) | {m[1]:.0f} | {proxy_cells} | {m[3]:.0f} | "
              f"{m[1] + m[2] + m[3]:.0f} | {m[4]:.2f} / {m[5]:.2f} / {m[6]:.2f} |")
    print(f"medians of {args.rounds} rounds, {args.messages} messages of {args.size} bytes a round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
