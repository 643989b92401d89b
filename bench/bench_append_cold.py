#!/usr/bin/env python3
"""A sync APPEND's three passes in memory, with the caches warm and cold: what the passes cost on
real sockets, reproduced without them.

On real sockets the proxy, the client and Dovecot take turns on one CPU (the path is serial), and
between two passes of the proxy Dovecot's ~500 us of work per message (or the client's) evicts
most of what the proxy's Python touches: a pass then costs 2-3 times its in-memory CPU, and
instruction counts (callgrind) do not see it. Here one session (``testing.fakes.SessionHarness``,
a scripted backend with QUOTA, the target known to take messages: the proxy answers ``+`` itself)
appends ``--count`` messages one by one: the APPEND line (answered ``+``), the literal with its
CRLF in one read (sent on as LITERAL+), the backend's tagged ``OK [APPENDUID ...]`` (relayed);
the CPU time (``process_time``) of each pass alone, measured with nothing between passes
(``--evict 0``: warm) and with ``--evict`` MiB of memory read and written between passes (not
timed): cold, as after another process's turn. ``--trees`` measures several checkouts'
packages in turn, each in a fresh process, ``--rounds`` times, order rotated.

    python bench/bench_append_cold.py --trees ",/tmp/before" --rounds 3 --evict 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def child(count: int, size: int, evict_mib: int) -> dict[str, float]:
    """Runs in the measured process (its sys.path already names the tree)."""
    import gc
    import hashlib
    import time

    from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, SessionHarness

    h = SessionHarness(connector=FakeConnector(capabilities=[*DOVECOT_CAPS, "QUOTA"]))
    h.login()
    h.send(b"a APPEND INBOX {3}\r\n")  # the first: GETQUOTAROOT and the backend's own +
    h.to_backend()
    h.from_backend(b'* QUOTAROOT INBOX ""\r\n* QUOTA "" (STORAGE 10 100000000)\r\nrp1 OK quota\r\n+ OK\r\n')
    h.to_client()
    h.send(b"abc\r\n")
    h.to_backend()
    h.from_backend(b"rp2 OK [APPENDUID 7 1] done\r\n")
    h.to_client()
    session, backend, client = h.session, h.backend, h.client
    body = b"x" * size + b"\r\n"
    junk = bytearray(evict_mib << 20)
    pages = len(junk[::4096])

    def evict() -> None:
        if junk:
            hashlib.md5(junk).digest()  # read it all
            junk[::4096] = bytes(pages)  # and dirty every page

    clock = time.process_time
    spent = [0.0, 0.0, 0.0]

    def one(i: int) -> None:
        evict()
        t0 = clock()
        session.dataReceived(b"b%d APPEND INBOX {%d}\r\n" % (i, size))
        t1 = clock()
        assert client.value() == b"+ Ready for literal data\r\n", client.value()
        client.clear()
        evict()
        t2 = clock()
        session.dataReceived(body)
        t3 = clock()
        out = backend.transport.value()
        backend.transport.clear()
        tag = out[:out.index(b" ")]
        evict()
        t4 = clock()
        backend.dataReceived(tag + b" OK [APPENDUID 7 %d] Append completed.\r\n" % (i + 2))
        t5 = clock()
        assert client.value().startswith(b"b%d OK " % i), client.value()
        client.clear()
        spent[0] += t1 - t0
        spent[1] += t3 - t2
        spent[2] += t5 - t4

    for i in range(100):  # warm-up: specialization, allocator pools
        one(i)
    spent[:] = [0.0, 0.0, 0.0]
    gc.disable()  # (the proxy's collections are rare: 0 in 1000 messages on sockets)
    for i in range(100, 100 + count):
        one(i)
    gc.enable()
    return {k: v / count * 1e6 for k, v in zip(("line", "literal", "completion"), spent)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="", help="comma-separated checkouts, '' = this one (default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=20480)
    ap.add_argument("--evict", default="0,1", help="comma-separated MiB evicted between passes")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    trees = args.trees.split(",")
    evicts = [int(e) for e in args.evict.split(",")]
    runs = [(t, e) for e in evicts for t in trees]
    results: dict[tuple[str, int], list[dict[str, float]]] = {run: [] for run in runs}
    for r in range(args.rounds):
        for j in range(len(runs)):
            tree, evict = runs[(j + r) % len(runs)]
            root = tree or str(HERE.parent.parent)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
            out = subprocess.run([sys.executable, str(HERE), "--child", str(args.count), str(args.size), str(evict)],
                                 env=env, cwd=root, check=True, capture_output=True, text=True).stdout
            results[(tree, evict)].append(json.loads(out))
            print(f"[bench] round {r + 1} {tree or 'this checkout'} evict {evict} MiB: {out.strip()}", file=sys.stderr)
    print("| tree | evicted between passes | APPEND line -> + | literal -> backend | completion -> client | "
          "per message (us, median of rounds) |")
    print("|---|---|---|---|---|---|")
    for tree, evict in runs:
        rows = results[(tree, evict)]
        cells = [statistics.median(row[k] for row in rows) for k in ("line", "literal", "completion")]
        total = statistics.median(sum(row.values()) for row in rows)
        print(f"| {tree or 'this checkout'} | {evict} MiB | " + " | ".join(f"{c:.1f}" for c in cells)
              + f" | {total:.1f} |")
    print(f"{args.count} messages of {args.size} bytes a run, {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
