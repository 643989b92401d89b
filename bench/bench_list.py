#!/usr/bin/env python3
"""LIST, LSUB and STATUS of each over many mailboxes spread over three backends, proxy vs direct.

Three real Dovecots (b1, b2 with ``B/*``, b3 with ``C/*``), --boxes mailboxes created
(and subscribed) directly on their owners in thirds (``A/n`` on b1, ``B/n``, ``C/n``),
then, through the proxy as alice: ``LIST "" *`` and ``LSUB "" *`` (best of 3, entries
counted), and ``STATUS (MESSAGES UIDNEXT)`` of every mailbox one after the other; the same
directly on b1 for its third (x3 for scale). --tree runs the proxy from another checkout
(an export of main) for a before/after. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PROXY_START_TIMEOUT, Harness, ProxyProcess, RawIMAP, log, quote  # noqa: E402
from _common import _ProxyProcess as Base  # noqa: E402


def best(c: RawIMAP, cmd: bytes, rounds: int = 3) -> tuple[float, int]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        _, lines = c.command(cmd)
        out.append(time.perf_counter() - t)
    return min(out), len(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, default=2000)
    ap.add_argument("--tree", help="run the proxy from this checkout (PYTHONPATH)")
    ap.add_argument("--spy", metavar="FILE", help="py-spy (raw) the proxy during 20 more LISTs into FILE")
    args = ap.parse_args()
    rules = "".join(f'\n[[map.rules]]\nmailbox = "{p}/*"\nbackend = "{b}"\n' for p, b in (("B", "b2"), ("C", "b3")))
    with Harness(backends=(("b1", "127.0.0.2"), ("b2", "127.0.0.3"), ("b3", "127.0.0.4")),
                 proxy_kw={"map_extra": rules}) as h:
        if args.tree:  # the proxy from another tree: started here instead of by the harness
            real = ProxyProcess.start
            ProxyProcess.start = lambda self: Base.start(self, timeout=PROXY_START_TIMEOUT, new_group=True,  # type: ignore[method-assign]
                                                         tied_to_parent=True, env={"PYTHONPATH": args.tree})
        h.start()
        if args.tree:
            ProxyProcess.start = real  # type: ignore[method-assign]
        t = time.monotonic()
        for b, prefix in (("b1", "A"), ("b2", "B"), ("b3", "C")):
            c = h.connect(b, b)
            for i in range(args.boxes // 3):
                name = quote(f"{prefix}/{i}")
                c.command(b"CREATE " + name)
                c.command(b"SUBSCRIBE " + name)
        log(f"created {args.boxes // 3 * 3} mailboxes in {time.monotonic() - t:.1f}s")
        d = h.connect("b1", "direct")
        p = h.connect("proxy", "proxy")
        out = {"boxes": args.boxes // 3 * 3, "tree": args.tree or "this"}
        for what, cmd in (("LIST", b'LIST "" "*"'), ("LSUB", b'LSUB "" "*"')):
            sd, nd = best(d, cmd)
            sp, np_ = best(p, cmd)
            out[what] = {"direct_b1_s": round(sd, 4), "direct_entries": nd, "proxy_s": round(sp, 4), "proxy_entries": np_}
            log(f"{what}: {out[what]}")
        for who, c, names in (("direct_b1", d, [f"A/{i}" for i in range(args.boxes // 3)]),
                              ("proxy", p, [f"{x}/{i}" for x in "ABC" for i in range(args.boxes // 3)])):
            t0 = time.perf_counter()
            for n in names:
                c.command(b"STATUS " + quote(n) + b" (MESSAGES UIDNEXT)")
            out[f"STATUS_each_{who}_s"] = round(time.perf_counter() - t0, 2)
        if args.spy:
            assert h.proxy is not None
            spy = subprocess.Popen(["py-spy", "record", "-p", str(h.proxy.pid), "-f", "raw", "-r", "500",
                                    "-o", args.spy], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            for _ in range(20):
                p.command(b'LIST "" "*"')
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
