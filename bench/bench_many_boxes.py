#!/usr/bin/env python3
"""A user with many small mailboxes moved whole: ``referral-proxy move alice "*" b2``.

Starts two real Dovecots (b1, b2) and the proxy's configuration (SQLite map store),
seeds alice with --boxes mailboxes of --per messages each directly on b1 (one
LITERAL+ MULTIAPPEND per mailbox, pipelined), then runs the admin move of the
whole user in a child process and reports its wall time, CPU seconds and peak RSS
(getrusage of the child), the journal's bytes written (the child counts the JSON
each store write serialises), and checks on b2 that every message arrived once
(by Message-ID). Run it for two --boxes values to see how the cost grows: a move's
cost should be linear in the mailboxes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, USER, Harness, RawIMAP, _pdeathsig, dovecot_available, log, quote  # noqa: E402

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER  # noqa: E402

CHILD = r"""
import json, sys, time, resource
import referral_proxy.store as st
written = [0, 0]
real = json.dumps
def counting(obj, *a, **k):
    text = real(obj, *a, **k)
    written[0] += len(text); written[1] += 1
    return text
st.json.dumps = counting
try:
    import referral_proxy.pgstore as pg
    pg.json.dumps = counting
except Exception:
    pass
from referral_proxy.cli import main
t0 = time.perf_counter()
try:
    rc = main(sys.argv[2:])
except SystemExit as e:
    rc = e.code
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "seconds": time.perf_counter() - t0, "journal_bytes": written[0],
               "journal_writes": written[1], "cpu": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
               "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
"""


def message(box: int, i: int) -> bytes:
    return (f"From: a@example.org\r\nTo: alice@example.org\r\nSubject: box {box} message {i}\r\n"
            f"Message-ID: <b{box}.m{i}@scale>\r\n\r\nbody {box}/{i}\r\n").encode()


def seed(c: RawIMAP, boxes: int, per: int) -> None:
    for b in range(boxes):
        name = b"F%04d" % b
        c.command(b"CREATE " + name)
        tag = c.next_tag()
        parts = [tag + b" APPEND " + name]
        for i in range(per):
            m = message(b, i)
            parts.append(b" {%d+}\r\n" % len(m) + m)
        c.sock.sendall(b"".join(parts) + b"\r\n")
        line, _ = c.read_tagged(tag)
        if b" OK" not in line:
            raise RuntimeError(line)


def census(c: RawIMAP) -> dict[bytes, int]:
    _, lines = c.command(b'LIST "" "*"')
    names = [ln.strip().rsplit(b" ", 1)[1].strip(b'"') for ln in lines if ln.startswith(b"* LIST")]
    seen: dict[bytes, int] = {}
    for n in names:
        c.command(b"EXAMINE " + quote(n.decode()))
        _, got = c.command(b"FETCH 1:* (ENVELOPE)", check=False)  # Message-ID in the envelope, quoted
        for k in re.findall(rb"<(b\d+\.m\d+@scale)>", b"\n".join(got)):
            seen[k] = seen.get(k, 0) + 1
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--per", type=int, default=3)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the move child into FILE")
    args = ap.parse_args()
    if dovecot_available() is not None:
        print("no Dovecot", file=sys.stderr)
        return 2
    proxy_kw = {"backend_extra": f'master_user = "{MASTER_USER}"\nmaster_password = "{MASTER_PASSWORD}"\n',
                "map_extra": 'store = "sqlite:map.sqlite3"\n'}
    with Harness(backends=(("b1", "127.0.0.2"), ("b2", "127.0.0.3")), proxy_kw=proxy_kw) as h:
        h.start()
        assert h.proxy is not None
        c1 = h.connect("b1", "b1")
        t = time.monotonic()
        seed(c1, args.boxes, args.per)
        log(f"seeded {args.boxes} x {args.per} on b1 in {time.monotonic() - t:.1f}s")
        out = h.proxy.workdir / "move.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        pre = ["-m", "cProfile", "-o", args.profile] if args.profile else []
        t = time.monotonic()
        r = subprocess.run([sys.executable, *pre, "-c", CHILD, str(out), "move", "--config",
                            str(h.proxy.config_path), USER, "*", "b2"], cwd=h.proxy.workdir, env=env,
                           capture_output=True, text=True, preexec_fn=_pdeathsig)
        wall = time.monotonic() - t
        res = json.loads(out.read_text()) if out.exists() else {}
        log(f"move rc={r.returncode} wall {wall:.1f}s {res}")
        if r.returncode:
            log(r.stderr[-2000:])
        c2 = h.connect("b2", "b2")
        seen = census(c2)
        want = {b"b%d.m%d@scale" % (b, i) for b in range(args.boxes) for i in range(args.per)}
        dup = sum(1 for k, v in seen.items() if v > 1)
        lost = len(want - set(seen))
        log(f"census on b2: {len(seen)} distinct, {lost} lost, {dup} twice or more")
        print(json.dumps({"boxes": args.boxes, "per": args.per, "wall": wall, **res, "lost": lost, "dup": dup,
                          "children_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
