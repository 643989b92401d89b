#!/usr/bin/env python3
"""A mailbox move's journal writes alone, on SQLite: the data grown as mover.py grows it (9 steps
per mailbox, one batch each), written step by step, then read back and compared.

    python bench/bench_journal.py --boxes 1000          # this tree
    PYTHONPATH=/work/main python bench/bench_journal.py --boxes 1000 --tree   # another tree's code

Isolates the journal's cost from Dovecot's (bench_many_boxes.py measures the whole move).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if "--tree" not in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from referral_proxy.journal import Reservation, Step  # noqa: E402
from referral_proxy.store import SQLiteStore  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--boxes", type=int, default=1000)
ap.add_argument("--tree", action="store_true", help="import referral_proxy from PYTHONPATH, not this tree")
n = ap.parse_args().boxes

written = [0]
real = json.dumps


def counting(o, *a, **k):
    t = real(o, *a, **k)
    written[0] += len(t)
    return t


def now(c):
    try:
        c.send(None)
    except StopIteration as e:
        return e.value


json.dumps = counting  # as bench_many_boxes.py counts the journal's bytes
st = SQLiteStore(Path(tempfile.mkdtemp()) / "map.sqlite3")
data: dict = {"old": "*", "new": "*", "src": "b1", "dst": "b2", "token": "abc", "pairs": [], "created": [],
              "validity": {}, "batches": [], "pending": None, "aside": [], "drained": [], "at": None}
t0, c0 = time.perf_counter(), time.process_time()
e = now(st.begin_move("alice", "move", [Reservation(None)], data, "me", "/"))


def step(s: Step) -> None:
    now(st.journal_step(e, s, data, "me"))


data["pairs"] = [[f"F{i:04d}", f"F{i:04d}"] for i in range(n)]
step(Step.PLANNED)
for i in range(n):  # create, then one verified batch (its hashes journaled before its last byte)
    data["at"] = i
    step(Step.CREATING)
    data["created"].append(i)
    step(Step.CREATED)
    data["validity"][str(i)] = 1700000000 + i
    rec = {"pair": i, "src": "1:3", "validity": 1700000000 + i, "uidnext": 1}
    data["pending"] = rec
    step(Step.COPYING)
    rec["hashes"] = ["a" * 64] * 3
    step(Step.COPYING)
    rec.update(dst="1:3", modseq=5)
    del rec["hashes"]
    data["batches"].append(rec)
    data["pending"] = None
    step(Step.COPIED)
for s in (Step.COMMITTED, Step.SUBSCRIBED, Step.PLACED):
    step(s)
for i in reversed(range(n)):  # set aside, drained
    data["aside"].append(i)
    data["at"] = i
    step(Step.ASIDE)
    data["drained"].append(i)
    step(Step.DRAINED)
(read,) = now(st.journal())
assert read.data == json.loads(real(data)), "the journal's data read back differs"
print(json.dumps({"boxes": n, "writes": 7 * n + 4, "seconds": round(time.perf_counter() - t0, 2),
                  "cpu": round(time.process_time() - c0, 2), "journal_bytes": written[0]}))
