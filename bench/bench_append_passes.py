#!/usr/bin/env python3
"""Where a one-by-one sync APPEND's proxy CPU goes on real sockets, loop pass by loop pass.

One Dovecot (maildirs on tmpfs) and one proxy per checkout (``--trees``: ``""`` = this one),
each started with ``bench/pass_site`` on its PYTHONPATH (its sitecustomize times the proxy's
loop passes by CPU, nothing else changed); bench_append's (c) client (``tag APPEND Bench {n}``,
wait for ``+``, the message, wait for the answer) against direct Dovecot and each proxy in
turn, order rotated every round.  Per message: the rate against direct's, the proxy's CPU
(user + system, /proc) and, per kind of pass (the client's APPEND line, which the proxy
answers ``+``; the client's literal, sent on to Dovecot; Dovecot's completion, relayed), the
CPU of its dispatch and of its end-of-pass writes (the ``send``s), means of the rounds.

    python bench/bench_append_passes.py --trees ",/tmp/before" --rounds 5 --messages 1000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import USER, install_signal_handlers, log, make_message, signalled_json  # noqa: E402
from bench_append import AppendClient, Control, check_replies  # noqa: E402
from bench_peers import bench_root  # noqa: E402
from peers import ReferralProxyTarget, stop_all, tree_cpu_user_system  # noqa: E402

from referral_proxy.fleet import Dovecot  # noqa: E402

SITE = Path(__file__).resolve().parent / "pass_site"
KINDS = {"client line": "APPEND line -> +", "client literal": "literal -> Dovecot", "backend line": "completion -> client"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="", help="comma-separated checkouts, '' = this one (default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=20480)
    args = ap.parse_args(argv)
    trees = args.trees.split(",")
    install_signal_handlers()
    root = bench_root()
    backend = Dovecot("passes", "127.0.0.2", root / "backend", users={USER: "secret"})
    targets: list[ReferralProxyTarget] = []
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PASS_STATS", "RP_TREE")}
    rates: dict[str, list[float]] = {t: [] for t in ["direct", *trees]}
    cpu: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
    passes: dict[str, dict[str, list[int]]] = {t: {} for t in trees}
    try:
        backend.start()
        for i, tree in enumerate(trees):
            os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SITE), saved["PYTHONPATH"]])),
                              PASS_STATS=str(root / f"passes{i}.json"), RP_TREE=tree)
            t = ReferralProxyTarget(root / f"p{i}", backend)
            t.start()
            targets.append(t)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        rng = random.Random(20240101)
        msgs = [make_message(i, args.size, rng) + b"\r\n" for i in range(1, args.messages + 1)]
        control = Control(backend.host, backend.port, "control")
        control.login(USER, backend.password(USER))
        names = ["direct", *trees]
        for r in range(args.rounds):
            for j in range(len(names)):
                name = names[(j + r) % len(names)]
                i = trees.index(name) if name != "direct" else -1
                host, port = (backend.host, backend.port) if i < 0 else (targets[i].host, targets[i].port)
                c = AppendClient(host, port, name or "this")
                c.login(USER, backend.password(USER))
                control.reset()
                c.command(b"NOOP")
                pid = None if i < 0 else targets[i].cpu_root
                if pid is not None:
                    signalled_json(root / f"passes{i}.json", pid)  # the login's passes left out
                    u0, s0 = tree_cpu_user_system(pid)
                ns, replies, _ = c.synchronizing(msgs)
                check_replies(name or "this", "c", replies, args.messages)
                assert control.count() == args.messages
                rates[name].append(args.messages / ns * 1e9)
                if pid is not None:
                    u1, s1 = tree_cpu_user_system(pid)
                    cpu[name].append(((u1 - u0) / args.messages * 1e6, (s1 - s0) / args.messages * 1e6))
                    for kind, row in signalled_json(root / f"passes{i}.json", pid).items():
                        sums = passes[name].setdefault(kind, [0, 0, 0])
                        for k in range(3):
                            sums[k] += row[k]
                c.close()
                log(f"round {r + 1} {name or 'this'}: {rates[name][-1]:.0f} msg/s")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(targets)
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)
    direct = statistics.median(rates["direct"])
    n = args.messages * args.rounds
    head = "| tree | msg/s (x direct) | CPU us/msg user + sys | " + " | ".join(
        f"{v}: dispatch + writes us" for v in KINDS.values()) + " | passes per msg |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in trees:
        med = statistics.median(rates[name])
        user = statistics.fmean(u for u, _s in cpu[name])
        system = statistics.fmean(s for _u, s in cpu[name])
        cells = []
        for kind in KINDS:
            row = passes[name].get(kind, [0, 0, 0])
            cells.append(f"{row[1] / n / 1000:.0f} + {row[2] / n / 1000:.0f}")
        count = sum(row[0] for row in passes[name].values()) / n
        print(f"| {name or 'this checkout'} | {med:.0f} (x{med / direct:.2f}) | {user:.0f} + {system:.0f} | "
              + " | ".join(cells) + f" | {count:.2f} |")
    print(f"direct: {direct:.0f} msg/s (median of {args.rounds}); {args.messages} messages of {args.size} bytes a round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
