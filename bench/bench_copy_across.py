#!/usr/bin/env python3
"""The cost of one small COPY across backends: latency per command, and the proxy's CPU.

Two real Dovecots (b1 default, ``Archive/*`` on b2) and the proxy (SQLite map store, or
``--store DSN``); one 2 KB message in alice's INBOX on b1; then, through the proxy, --n times
``UID COPY 1 Archive/Small`` (across: since copyhold21 it first looks for a MOVE across holding its
source or destination, in the cached reservations: copywait.py; branch copylock19 wrote a journal
entry per COPY instead) and --n times ``UID COPY 1 Local`` (on b1: relayed, no journal; since dup22
after the same cached check: a MOVE across from INBOX or into Local),
one after the other, and direct ``UID COPY 1 Local`` on b1 for scale. The census checks b2 holds n.

    python3 bench/bench_copy_across.py --n 200
    cd <another tree> && python3 <this file> --n 200     # that tree's proxy (the proxy runs from
                                                         # the checkout bench/_common.py is in)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Harness, RawIMAP, cpu_seconds, log, percentile  # noqa: E402

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER  # noqa: E402


def timed(c: RawIMAP, cmd: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        answer, _ = c.command(cmd, check=False)
        out.append(time.perf_counter() - t0)
        if b" OK" not in answer:
            raise RuntimeError(f"{cmd!r}: {answer!r}")
    return sorted(out)


def figures(samples: list[float]) -> dict:
    return {"median_ms": round(percentile(samples, 50) * 1000, 2), "p90_ms": round(percentile(samples, 90) * 1000, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--store", default="sqlite:map.sqlite3")
    n = ap.parse_args().n
    store = ap.parse_args().store
    proxy_kw = {"backend_extra": f'master_user = "{MASTER_USER}"\nmaster_password = "{MASTER_PASSWORD}"\n',
                "map_extra": f'store = "{store}"\n\n[[map.rules]]\nmailbox = "Archive/*"\nbackend = "b2"\n'}
    with Harness(backends=(("b1", "127.0.0.2"), ("b2", "127.0.0.3")), proxy_kw=proxy_kw) as h:
        h.start()
        assert h.proxy is not None
        c1 = h.connect("b1", "b1")
        body = b"From: a@example.org\r\nSubject: small\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2
        c1.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
        c1.command(b"CREATE Local")
        c2 = h.connect("b2", "b2")
        c2.command(b"CREATE Archive/Small")
        p = h.connect("proxy", "proxy")
        p.command(b"SELECT INBOX")
        c1.command(b"SELECT INBOX")
        out: dict = {"n": n, "store": store.split(":")[0]}
        timed(p, b"UID COPY 1 Archive/Small", 5)  # warm: connections, caches
        for name, client, cmd in (("across", p, b"UID COPY 1 Archive/Small"), ("local", p, b"UID COPY 1 Local"),
                                  ("direct_local", c1, b"UID COPY 1 Local")):
            cpu0 = cpu_seconds(h.proxy.pid) or 0.0
            samples = timed(client, cmd, n)
            cpu = (cpu_seconds(h.proxy.pid) or 0.0) - cpu0
            out[name] = {**figures(samples), "proxy_cpu_ms_per_copy": round(cpu / n * 1000, 3)}
            log(f"{cmd.decode()} ({name}): {out[name]}")
        c2.command(b"EXAMINE Archive/Small")
        _, got = c2.command(b"SEARCH ALL", check=False)
        out["census_b2"] = sum(len(ln.split()) - 2 for ln in got if ln.startswith(b"* SEARCH"))
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
