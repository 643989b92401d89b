#!/usr/bin/env python3
"""Instructions a real proxy process spends per command of the stress mix, exactly (callgrind).

Where does the stress mix's proxy CPU go, command by command? One Dovecot (alice's INBOX
seeded with 30 of loadgen's messages), one proxy under valgrind's callgrind (user space of
the whole process), one client sending loadgen's commands as loadgen builds them (its
``Client`` methods and seeded random choices): for each kind, a fresh logged-in session
with INBOX selected, 5 commands to warm up, counters zeroed, N/5 commands counted, then
again N; instructions per command = the difference / (N - N/5), start-up, login and
warm-up cancelling out. Independent of the machine's load, unlike CPU time.

    python bench/bench_stress_cpu.py                       # every kind, N = 100
    python bench/bench_stress_cpu.py --tree /tmp/main --kinds FETCH,SELECT

Kinds (loadgen's names): LIST, STATUS, SELECT (again, in the selected state), FETCH, FETCH2,
STORE, DELETE (``STORE <seqs> +FLAGS[.SILENT] \\Deleted``), APPEND (LITERAL+, one message),
XCYCLE (``STORE n +FLAGS.SILENT \\Deleted``, ``EXPUNGE``, an APPEND back: EXPUNGE is XCYCLE
minus DEL1 minus APPEND, DEL1 being the cycle's STORE alone), SESSION (connect, greeting,
LOGIN, LOGOUT, close: with the proxy's backend keepalive, one user's next login takes the
parked backend connection, as ~86 % of the stress mix's logins do). Weights: ``--mix
FILE`` (loadgen.py's ``--json`` output) gives each kind's share of the mix's ops.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PROXY_HOST,
    USER,
    Dovecot,
    ProxyProcess,
    RawIMAP,
    _ProxyProcess,
    install_signal_handlers,
    make_root,
)
from bench_append_cpu import _counted  # noqa: E402
from loadgen import FETCH2_FIELDS, Client, fetch_items, make_messages  # noqa: E402

KINDS = ("SESSION", "LIST", "STATUS", "SELECT", "FETCH", "FETCH2", "STORE", "DELETE", "DEL1", "APPEND", "XCYCLE")
MSGS = 30
_EXISTS = re.compile(rb"\* (\d+) EXISTS")


class Gen(Client):
    """loadgen's command builders, without its socket."""

    def __init__(self, seed: int, messages: list[bytes]) -> None:  # noqa: D107 (no Client.__init__: no config)
        self.rng = random.Random(seed)
        self.messages = messages

    def fetch(self) -> bytes:
        return b"FETCH " + self._seqset(MSGS, MSGS) + b" (" + fetch_items(self.rng) + b")"

    def fetch2(self) -> bytes:
        return b"FETCH %d (UID %s)" % (self.rng.randrange(MSGS) + 1, self.rng.choice(FETCH2_FIELDS).encode())

    def store(self) -> bytes:
        rng = self.rng
        count = rng.randrange(MSGS // 5) + 1
        kind = rng.choice((b"+", b"-", b""))
        silent = b".SILENT" if rng.randrange(2) else b""
        return b"STORE %s %sFLAGS%s (%s)" % (self._seqset(count, MSGS), kind, silent, self._flags())

    def delete(self) -> bytes:
        silent = b".SILENT" if self.rng.randrange(2) else b""
        return b"STORE %s +FLAGS%s \\Deleted" % (self._seqset(self.rng.randrange(4) + 1, MSGS), silent)

    def append(self) -> bytes:
        return b'APPEND "INBOX"' + self._append_part()


def _zero(pid: int) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)


def session_once(port: int, password: str) -> None:
    c = RawIMAP(PROXY_HOST, port, "session")
    c.login(USER, password)
    c.command(b"LOGOUT")
    c.sock.close()


def steps(kind: str, g: Gen, c: RawIMAP) -> Callable[[], None]:
    """One command (or XCYCLE's three) of *kind* on *c*."""
    simple: dict[str, Callable[[], bytes]] = {
        "LIST": lambda: b'LIST "" *', "STATUS": lambda: b'STATUS "INBOX" (MESSAGES UNSEEN RECENT)',
        "SELECT": lambda: b'SELECT "INBOX"', "FETCH": g.fetch, "FETCH2": g.fetch2, "STORE": g.store,
        "DELETE": g.delete, "DEL1": lambda: b"STORE %d +FLAGS.SILENT \\Deleted" % (g.rng.randrange(MSGS) + 1),
        "APPEND": g.append,
    }
    if kind in simple:
        make = simple[kind]

        def one() -> None:
            c.command(make())
        return one
    assert kind == "XCYCLE"

    def cycle() -> None:
        c.command(b"STORE %d +FLAGS.SILENT \\Deleted" % (g.rng.randrange(MSGS) + 1))
        c.command(b"EXPUNGE")
        c.command(g.append())
    return cycle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--count", type=int, default=100, help="N (100)")
    ap.add_argument("--json", help="write {kind: instructions per command} here")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (callgrind's dumps, logs)")
    args = ap.parse_args()
    install_signal_handlers()
    root = make_root("rp-stresscpu-")
    d = Dovecot("stresscpu", "127.0.0.2", root / "b1")
    out = root / "callgrind.out"
    p: ProxyProcess | None = None
    messages = make_messages(200, random.Random(7))
    results: dict[str, float] = {}
    try:
        d.start()
        password = d.password(USER)
        seeder = RawIMAP(d.host, d.port, "seed")
        seeder.login(USER, password)
        for m in messages[:MSGS]:
            tag = seeder.next_tag()
            seeder.sock.sendall(tag + b' APPEND "INBOX" {%d+}\r\n' % len(m) + m + b"\r\n")
            seeder.read_tagged(tag)
        (root / "p").mkdir()
        p = ProxyProcess(root / "p", d)
        _ProxyProcess.start(p, timeout=300, new_group=True, tied_to_parent=True,
                            env={"PYTHONPATH": str(Path(args.tree).resolve())},
                            command=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                     os.path.realpath(sys.executable), "-m", "referral_proxy"])
        assert p.process is not None
        pid = p.process.pid
        n = args.count
        for kind in args.kinds.split(","):
            counts = []
            for k, count in enumerate((n // 5, n)):
                g = Gen(1000 + k, messages)
                if kind == "SESSION":
                    for _ in range(5):
                        session_once(p.port, password)
                    _zero(pid)
                    for _ in range(count):
                        session_once(p.port, password)
                    counts.append(_counted(pid, out, f"{kind}{k}"))
                    continue
                c = RawIMAP(PROXY_HOST, p.port, kind)
                c.login(USER, password)
                c.command(b'SELECT "INBOX"')
                one = steps(kind, g, c)
                for _ in range(5):
                    one()
                _zero(pid)
                for _ in range(count):
                    one()
                counts.append(_counted(pid, out, f"{kind}{k}"))
                # back to MSGS messages, none \Deleted, for the next kind
                c.command(b"STORE 1:* -FLAGS.SILENT (\\Deleted)")
                _line, untagged = c.command(b'SELECT "INBOX"')
                exists = max(int(m.group(1)) for m in map(_EXISTS.match, untagged) if m)
                if exists > MSGS:
                    c.command(b"STORE %d:%d +FLAGS.SILENT (\\Deleted)" % (MSGS + 1, exists))
                    c.command(b"EXPUNGE")
                c.command(b"LOGOUT")
                c.sock.close()
            per = (counts[1] - counts[0]) / (n - n // 5)
            results[kind] = per
            print(f"{kind:8s} {per / 1000:8.1f}k instructions per {'session' if kind == 'SESSION' else 'command'}"
                  f" ({args.tree})", flush=True)
        if {"XCYCLE", "DEL1", "APPEND"} <= results.keys():
            results["EXPUNGE"] = results["XCYCLE"] - results["DEL1"] - results["APPEND"]
            print(f"EXPUNGE  {results['EXPUNGE'] / 1000:8.1f}k instructions per command (XCYCLE - DEL1 - APPEND)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if p is not None:
            p.stop()
        d.stop()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
