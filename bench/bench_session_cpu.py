#!/usr/bin/env python3
"""Python CPU time the session spends on one relayed command, in memory (no sockets).

A ClientSession on Twisted's in-memory transports with a scripted backend
(referral_proxy.testing.fakes): each round sends one command from the client and
its completion from the backend. CPU time (process_time), best of --rounds, per
command. ``--tree DIR`` measures another checkout (e.g. the main branch before a
change) the same way, so two trees can be compared in turns on one machine:

    python bench/bench_session_cpu.py --tree /path/to/old/checkout
    python bench/bench_session_cpu.py
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS = [
    ("NOOP", b"NOOP", b"rp%d OK NOOP completed.\r\n"),
    ("UID FETCH", b"UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
     b"* 1 FETCH (FLAGS (\\Seen) UID 1)\r\nrp%d OK done\r\n"),
    ("SEARCH literal", b"SEARCH TEXT {5+}\r\nhello", b"* SEARCH 1\r\nrp%d OK done\r\n"),
]


def measure(count: int, command: bytes, response: bytes, check: Callable[[Any], None] | None = None) -> float:
    """CPU microseconds per command; *check(harness)* is called at the end (bench_metrics_cost.py)."""
    from referral_proxy.testing.fakes import SessionHarness

    h = SessionHarness()
    h.login()
    h.send(b"s SELECT INBOX\r\n")
    h.from_backend(b"rp1 OK selected\r\n")
    h.to_client()
    h.to_backend()
    backend = h.backend
    gc.disable()
    t0 = time.process_time()
    for i in range(count):
        h.session.dataReceived(b"a%d %s\r\n" % (i, command))
        backend.dataReceived(response % (i + 2))
        h.client.clear()
        backend.transport.clear()
    t1 = time.process_time()
    gc.enable()
    if check is not None:
        check(h)
    return (t1 - t0) / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, args.tree)
    for name, command, response in COMMANDS:
        best = min(measure(args.count, command, response) for _ in range(args.rounds))
        print(f"{name:16s} {best:7.2f} us CPU per command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
