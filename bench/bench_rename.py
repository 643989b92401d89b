#!/usr/bin/env python3
"""Moving a mailbox to another backend: proxy RENAME and admin ``move`` vs. the physical limit.

Starts two real Dovecot instances (b1 on 127.0.0.2, b2 on 127.0.0.3) and the proxy
(``python -m referral_proxy`` on 127.0.0.1) in front of them: both backends with the
test master user, ``[map] default = "b1"``, a SQLite map store and the rule
``Archive/* -> b2``.  Seeds alice's mailbox "Big" directly on b1 (ONE MULTIAPPEND
of N messages), then measures, in one run:

1. the physical limit: a direct raw-socket ``UID FETCH 1:* BODY.PEEK[]`` of "Big"
   from b1 (bytes counted until the tagged OK), best of 3;
2. through the proxy, as alice: ``RENAME Big Archive/Big`` (the proxy copies every
   message to b2 with streamed MULTIAPPENDs, verifies, deletes the source), from
   sending the command to its tagged OK; checked on the backends afterwards;
   1 or 2 runs (2 if the whole benchmark stays within --budget);
3. the admin command ``python -m referral_proxy move --config CFG alice Big b2``
   (same data, re-seeded), once.

Between runs everything is reset: the mailboxes are deleted directly on both
backends, the placements removed with ``referral-proxy map unset``, "Big" seeded again.

Also measured, to see where the time goes (the proxy reads each message with a
UID FETCH of its own and appends in MULTIAPPENDs of 500): the direct FETCH with one
UID FETCH per message; the seeding MULTIAPPEND (the write side alone); before every
RENAME run, four copies b1 -> b2 that the benchmark streams itself (one FETCH or one
per message, into one MULTIAPPEND or MULTIAPPENDs of 500); and, once more re-seeded,
the admin move with timers around its steps (monkeypatched in that child process
only), which shows the phases of the Mover code a RENAME runs too.  MB/s = message
bytes / time, 1 MB = 10**6 bytes.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO_ROOT,
    USER,
    Dovecot,
    Harness,
    ProtocolError,
    RawIMAP,
    _pdeathsig,
    announced_literal,
    apply_pin,
    cpu_seconds,
    dovecot_available,
    environment,
    install_signal_handlers,
    log,
    make_message,
    quote,
    render_table,
    report,
    run_cli,
)

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER  # noqa: E402
from referral_proxy.mover import BATCH_MESSAGES  # noqa: E402

BACKENDS = (("b1", "127.0.0.2"), ("b2", "127.0.0.3"))
SOURCE = "Big"
TARGET = "Archive/Big"
FINISH_WAIT = 300.0  # seconds a move may go on finishing after its answer
SCRATCH = "Scratch"  # on b2: the benchmark's own copies
# the benchmark's own copies: name -> (one UID FETCH per message?, MULTIAPPENDs of BATCH_MESSAGES?)
COPIES = {
    "bulk_one": (False, False),
    "bulk_batched": (False, True),
    "per_message_one": (True, False),
    "per_message_batched": (True, True),
}
DEFAULT_BUDGET = 180.0  # seconds for the whole run: decides 1 or 2 RENAME runs
MOVE_TIMEOUT = 900.0  # seconds for one RENAME / move before the run fails
CLK_TCK = os.sysconf("SC_CLK_TCK")

_APPENDUID = re.compile(rb"^\S+ OK \[APPENDUID (\d+) ([0-9:,]+)\]")
_RENAMED = re.compile(rb"\((\d+) mailbox\(es\), (\d+) message\(s\)")
_MOVED = re.compile(r"(\d+) mailbox\(es\), (\d+) message\(s\), ([0-9.]+) MB in ([0-9.]+)s \(([0-9.]+) MB/s\)")


# ----------------------------------------------------------------------------- client


class Client(RawIMAP):
    """The shared raw client (bench/_common.py) plus what this benchmark does."""

    def examine(self, mailbox: str) -> int:
        _, untagged = self.command(b"EXAMINE " + quote(mailbox))
        for line in untagged:
            m = re.match(rb"\* (\d+) EXISTS", line)
            if m:
                return int(m.group(1))
        raise ProtocolError(f"{self.label}: no EXISTS in the EXAMINE answer")

    def unselect(self) -> None:
        self.command(b"UNSELECT")

    def exists(self, mailbox: str) -> bool:
        _, untagged = self.command(b'LIST "" ' + quote(mailbox))
        return any(line.startswith(b"* LIST ") for line in untagged)

    def contents(self, mailbox: str) -> tuple[int, int]:
        """(messages, total RFC822.SIZE) of *mailbox*."""
        n = self.examine(mailbox)
        total = 0
        if n:
            _, untagged = self.command(b"FETCH 1:* (RFC822.SIZE)")
            sizes = [int(m.group(1)) for line in untagged
                     for m in [re.search(rb"RFC822\.SIZE (\d+)", line)] if m]
            if len(sizes) != n:
                raise ProtocolError(f"{self.label}: {len(sizes)} sizes for {n} messages in {mailbox}")
            total = sum(sizes)
        self.unselect()
        return n, total

    def multiappend(self, mailbox: str, body: bytes) -> tuple[int, bytes]:
        """Send ``tag APPEND <mailbox>`` + *body* (the literals and the final CRLF, all
        LITERAL+): (ns from the first byte to the tagged reply, the tagged reply).
        Dovecot answers only at the end, so a blocking send cannot deadlock."""
        tag = self.next_tag()
        t0 = time.perf_counter_ns()
        self.sock.sendall(tag + b" APPEND " + quote(mailbox))
        self.sock.sendall(body)
        line, _ = self.read_tagged(tag)
        t1 = time.perf_counter_ns()
        if not _APPENDUID.match(line):
            raise ProtocolError(f"{self.label}: APPEND {mailbox} failed: {line[:200]!r}")
        return t1 - t0, line

    def timed(self, text: bytes, timeout: float) -> tuple[int, bytes]:
        """One command (no literals), from send to tagged reply: (ns, tagged line)."""
        if self.buf:
            raise ProtocolError(f"{self.label}: unexpected pending data {bytes(self.buf[:80])!r}")
        tag = self.next_tag()
        self.sock.settimeout(timeout)
        try:
            t0 = time.perf_counter_ns()
            self.sock.sendall(tag + b" " + text + b"\r\n")
            line, _ = self.read_tagged(tag)
            t1 = time.perf_counter_ns()
        finally:
            self.sock.settimeout(60.0)
        return t1 - t0, line


def build_body(messages: list[bytes]) -> bytes:
    """What follows ``tag APPEND <mailbox>`` in one MULTIAPPEND of *messages*."""
    parts = []
    for msg in messages:
        parts += (b" {%d+}\r\n" % len(msg), msg)
    parts.append(b"\r\n")
    return b"".join(parts)


# ----------------------------------------------------------------------------- CPU


def group_cpu(dovecot: Dovecot) -> tuple[float, float]:
    """(user, system) CPU seconds of a Dovecot instance so far: every process of its
    process group, with the children it has reaped (cutime/cstime: ended imap sessions count)."""
    assert dovecot.process is not None
    pgid = dovecot.process.pid
    user = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) < 15 or int(fields[2]) != pgid:
            continue
        user += int(fields[11]) + int(fields[13])  # utime + cutime
        system += int(fields[12]) + int(fields[14])  # stime + cstime
    return user / CLK_TCK, system / CLK_TCK


class CpuMeter:
    """CPU seconds of b1, b2 (and their system part), the proxy, this process and its
    reaped children over a block."""

    def __init__(self, h: Harness) -> None:
        self.h = h

    def _now(self) -> dict[str, float]:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        b1, b2 = group_cpu(self.h.dovecots["b1"]), group_cpu(self.h.dovecots["b2"])
        return {
            "b1": sum(b1), "b2": sum(b2), "b1_sys": b1[1], "b2_sys": b2[1],
            "proxy": cpu_seconds(self.h.proxy.pid) or 0.0 if self.h.proxy else 0.0,
            "client": time.process_time(), "children": ch.ru_utime + ch.ru_stime,
        }

    def start(self) -> None:
        self._before_sessions = {n: set(d.sessions(USER)) for n, d in self.h.dovecots.items()}
        self._t0 = self._now()

    def stop(self) -> dict[str, float]:
        # Wait until the imap sessions opened meanwhile have ended (their CPU then
        # counts in the master's cutime); a proxy logs its transfer connections out
        # after the tagged OK.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if all(set(d.sessions(USER)) <= self._before_sessions[n] for n, d in self.h.dovecots.items()):
                break
            time.sleep(0.02)
        time.sleep(0.05)
        t1 = self._now()
        return {k: round(t1[k] - self._t0[k], 3) for k in t1}


# ----------------------------------------------------------------------------- the benchmark's own copy


def stream_copy(src: Client, dst: Client, mailbox: str, n: int, per_message: bool, batch: int) -> tuple[int, int, int]:
    """Copy the EXAMINEd mailbox of *src* (UIDs 1..n) to *mailbox* on *dst*: every
    BODY.PEEK[] literal is forwarded chunk by chunk into a MULTIAPPEND as it arrives.
    *per_message*: one ``UID FETCH u BODY.PEEK[]`` per message, one after the other
    (as the proxy does), else one ``UID FETCH 1:*``; a MULTIAPPEND is closed (and
    its OK awaited) every *batch* messages.  (ns, messages, literal bytes)."""
    ssock, dsock = src.sock, dst.sock
    rbuf, view = src.recv_buf, src.recv_view
    st = {"open": None, "in_batch": 0, "messages": 0, "bytes": 0, "skip": 0}
    replies: list[bytes] = []

    def close_append() -> None:
        tag = st["open"]
        dsock.sendall(b"\r\n")
        line, _ = dst.read_tagged(tag)
        if not _APPENDUID.match(line):
            raise ProtocolError(f"copy: APPEND failed: {line[:200]!r}")
        replies.append(line)
        st["open"], st["in_batch"] = None, 0

    def fetch(command: bytes) -> None:
        tag = src.next_tag()
        prefix = tag + b" "
        partial = b""
        ssock.sendall(tag + b" " + command + b"\r\n")
        while True:
            k = ssock.recv_into(rbuf)
            if not k:
                raise ProtocolError("copy: the source closed the connection")
            pos = 0
            while pos < k:
                skip = st["skip"]
                if skip:
                    take = skip if skip < k - pos else k - pos
                    dsock.sendall(view[pos:pos + take])
                    st["skip"] = skip - take
                    pos += take
                    if st["skip"] == 0 and st["in_batch"] >= batch:
                        close_append()
                    continue
                i = rbuf.find(b"\n", pos, k)
                if i < 0:
                    partial += view[pos:k]
                    break
                line = partial + view[pos:i + 1] if partial else bytes(view[pos:i + 1])
                partial = b""
                pos = i + 1
                spec = announced_literal(line) if line.endswith(b"}\r\n") else None
                if spec is not None:
                    size = spec.size
                    if st["open"] is None:
                        st["open"] = dst.next_tag()
                        dsock.sendall(st["open"] + b" APPEND " + quote(mailbox))
                    dsock.sendall(b" {%d+}\r\n" % size)
                    st["skip"] = size
                    st["in_batch"] += 1
                    st["messages"] += 1
                    st["bytes"] += size
                    if size == 0 and st["in_batch"] >= batch:
                        close_append()
                    continue
                if line.startswith(prefix):
                    if not line.startswith(prefix + b"OK"):
                        raise ProtocolError(f"copy: {command!r} failed: {line!r}")
                    if pos != k:
                        raise ProtocolError("copy: data after the FETCH's tagged reply")
                    return

    t0 = time.perf_counter_ns()
    if per_message:
        for uid in range(1, n + 1):
            fetch(b"UID FETCH %d BODY.PEEK[]" % uid)
    else:
        fetch(b"UID FETCH 1:* BODY.PEEK[]")
    if st["open"] is not None:
        close_append()
    t1 = time.perf_counter_ns()
    return t1 - t0, st["messages"], st["bytes"]


# ----------------------------------------------------------------------------- the instrumented move

# Runs ``referral-proxy move`` in a child with timers wrapped around the transfer's steps
# (monkeypatched in that child only; the proxy's code is not changed).  The same Mover
# code serves the proxy's RENAME.  argv: OUT-JSON, then the move command's arguments.
PHASES_CHILD = r"""
import json, sys, time
from referral_proxy import mailops, movecli, mover, recovery, routing, transfer
from referral_proxy.cli import main
pc = time.perf_counter
events = []

def wrap(owner, name, label, verb=False, is_async=True):
    orig = getattr(owner, name)
    if is_async:
        async def w(*a, **k):
            t0 = pc()
            try:
                return await orig(*a, **k)
            finally:
                events.append((("command " + a[1].split(None, 1)[0].decode("ascii", "replace").upper())
                               if verb else label, t0, pc()))
    else:
        def w(*a, **k):
            t0 = pc()
            try:
                return orig(*a, **k)
            finally:
                events.append((label, t0, pc()))
    setattr(owner, name, w)

wrap(recovery, "connect_backend", "connect")
wrap(movecli, "_totals", "totals")
wrap(mover, "run_ok", None, verb=True)
wrap(mailops, "run_ok", None, verb=True)
wrap(mover, "exists", "exists")
wrap(mover, "search_uids", "fix_uids")
wrap(mover, "fetch_infos", "fetch_infos")
wrap(mover, "copy_stream", "copy_stream")
wrap(transfer._Bodies, "run", "stream_bodies")
wrap(mover.Mover, "rename", "rename")
wrap(mover.Mover, "plan", "plan")
wrap(mover.Mover, "_copy", "copy_mailbox")
wrap(mover, "verify_copies", "verify")
wrap(mover.Mover, "_finish", "finish")
wrap(routing.MailboxMap, "step", "journal")

# b2's back-pressure: how long the source connection was paused (b2 not reading fast enough)
_paused = {}
_pause, _resume = transfer._Pause.pauseProducing, transfer._Pause.resumeProducing

def pause(self):
    _paused.setdefault(id(self), pc())
    return _pause(self)

def resume(self):
    t0 = _paused.pop(id(self), None)
    if t0 is not None:
        events.append(("paused", t0, pc()))
    return _resume(self)

transfer._Pause.pauseProducing, transfer._Pause.resumeProducing = pause, resume
t0 = pc()
status = main(sys.argv[2:])
t1 = pc()
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "main": [t0, t1], "events": events}, f)
sys.exit(status)
"""


def phases(data: dict, wall: float) -> list[tuple[str, float, str]]:
    """(label, seconds, note) rows from the instrumented move's events."""
    ev = [(lab, a, b) for lab, a, b in data["events"]]

    def spans(label: str, within: tuple[float, float] | None = None,
              outside: tuple[float, float] | None = None) -> list[tuple[float, float]]:
        out = []
        for lab, a, b in ev:
            if lab != label:
                continue
            if within and not (within[0] <= a and b <= within[1]):
                continue
            if outside and outside[0] <= a and b <= outside[1]:
                continue
            out.append((a, b))
        return out

    tot = lambda xs: sum(b - a for a, b in xs)  # noqa: E731
    m0, m1 = data["main"]
    ren = spans("rename")[0]
    fin = (spans("finish") or [(ren[1], ren[1])])[0]
    copy_main = spans("copy_mailbox", ren, fin)
    cm = copy_main[0] if copy_main else (ren[0], ren[0])
    batches = spans("copy_stream", cm)
    msgs = [m for m in spans("stream_bodies", cm) if any(a <= m[0] and m[1] <= b for a, b in batches)]
    batch_wait = sum(b - a - tot([m for m in msgs if a <= m[0] and m[1] <= b]) for a, b in batches)
    verify = tot(spans("verify", cm))
    prep = tot(spans("command EXAMINE", (cm[0], batches[0][0] if batches else cm[1]))) \
        + tot(spans("fix_uids", cm)) + tot(spans("fetch_infos", cm))
    journal = spans("journal", ren)
    connects = spans("connect", ren)
    deletes = spans("command DELETE", fin)
    tspan = (spans("totals") or [(ren[0], ren[0])])[0]
    rows = [
        ("Python start-up, imports, exit", wall - (m1 - m0), "wall clock - main()"),
        ("main() until the move: config, map store, reactor", tspan[0] - m0, ""),
        ("progress-bar totals (connect, LIST, STATUS)", tspan[1] - tspan[0], ""),
        ("Mover.rename, in all", ren[1] - ren[0], "= the indented rows"),
        ("  connect + log in to b1 and b2", tot(connects), f"{len(connects)} connections"),
        ("  plan, exists checks (LIST)", tot(spans("plan", ren)) + tot(spans("exists", ren, fin)), ""),
        ("  journal steps (SQLite commits)", tot(journal), f"{len(journal)} steps"),
        ("  CREATE on b2", tot(spans("command CREATE", ren)), ""),
        ("  EXAMINE, UID SEARCH, FETCH (FLAGS INTERNALDATE RFC822.SIZE)", prep, ""),
        ("  bodies: one UID FETCH per batch, streamed to b2", tot(msgs),
         f"{len(msgs)} batch(es)"),
        ("  batch ends: waiting for the MULTIAPPEND's OK", batch_wait, f"{len(batches)} batches"),
        ("  verify on b2 (EXAMINE, bodies read back and hashed)", verify, ""),
        ("  finish: subscriptions, placements, empty in place, RENAME aside, DELETE", tot(spans("finish")), ""),
    ]
    accounted = sum(r[1] for r in rows[4:])
    rows.append(("  other (between the steps above)", (ren[1] - ren[0]) - accounted, ""))
    paused = spans("paused", cm)
    rows.append(("    (in the body streaming: b1 paused by b2's back-pressure)", tot(paused),
                 f"{len(paused)} pauses; the rest: round trips + proxy"))
    rows.append(("    (in finish: DELETE of the source on b1)", tot(deletes), "included above"))
    rows.append(("after Mover.rename: log-out, reactor stop", m1 - ren[1], ""))
    return rows


# ----------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, h: Harness, args: argparse.Namespace) -> None:
        self.h, self.args = h, args
        self.b1, self.b2 = h.dovecots["b1"], h.dovecots["b2"]
        assert h.proxy is not None
        self.proxy = h.proxy
        self.cfg = str(self.proxy.config_path)
        self.store = self.proxy.workdir / "map.sqlite3"
        self.n = args.messages
        rng = random.Random(20240101)
        messages = [make_message(i, args.size, rng) for i in range(1, self.n + 1)]
        self.nbytes = sum(map(len, messages))
        self.body = build_body(messages)
        del messages
        self.c1: Client = h.connect("b1", "b1 control", cls=Client)  # type: ignore[assignment]
        self.c2: Client = h.connect("b2", "b2 control", cls=Client)  # type: ignore[assignment]
        self.cpu = CpuMeter(h)
        self.seeds: list[dict] = []
        self.deletes: list[float] = []  # seconds of direct DELETEs of a full mailbox

    # -- helpers

    def cli(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-m", "referral_proxy", *argv], cwd=self.proxy.workdir, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_pdeathsig)

    def placements(self) -> dict[str, str]:
        r = self.cli("map", "--config", self.cfg, "show", USER)
        if r.returncode != 0:
            raise RuntimeError(f"map show failed ({r.returncode}): {r.stderr.strip()}")
        out, on = {}, False
        for line in r.stdout.splitlines():
            if line.startswith("placements:"):
                on = True
                continue
            if on and line.startswith("  ") and " -> " in line:
                name, _, backends = line.strip().rpartition(" -> ")
                out[name] = backends
            elif on:
                break
        return out

    def journal_entries(self) -> int:
        if not self.store.exists():
            return 0
        with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM journal").fetchone()[0]

    def check_moved(self, src_name: str, dst: Client, dst_name: str, what: str) -> None:
        """*dst_name* on b2 holds every message, "Big" is gone from b1, the map says b2, no journal left."""
        n, size = dst.contents(dst_name)
        if (n, size) != (self.n, self.nbytes):
            raise ProtocolError(f"{what}: b2 {dst_name} holds {n} messages / {size} bytes, "
                                f"expected {self.n} / {self.nbytes}")
        # A big mailbox's answer may come before its source is emptied (mover.ANSWER_WITHIN past the
        # commit point: the rest finishes behind): wait for that end, as the journal entry says
        waited = time.monotonic()
        while (self.c1.exists(src_name) or self.journal_entries()) and time.monotonic() - waited < FINISH_WAIT:
            time.sleep(0.5)
        if time.monotonic() - waited > 0.5:
            log(f"{what}: finished {time.monotonic() - waited:.1f}s after the answer")
        if self.c1.exists(src_name):
            raise ProtocolError(f"{what}: b1 still has {src_name}")
        placed = self.placements()
        if placed.get(dst_name) != "b2":
            raise ProtocolError(f"{what}: the map does not place {dst_name} on b2: {placed}")
        left = self.journal_entries()
        if left:
            raise ProtocolError(f"{what}: {left} journal entr(y/ies) left in the map store")

    # -- steps

    def reset(self) -> float:
        """Delete the test mailboxes on both backends, remove every placement of USER."""
        t0 = time.monotonic()
        for c, names in ((self.c1, (SOURCE,)), (self.c2, (TARGET, "Archive", SOURCE, SCRATCH))):
            for name in names:
                if c.exists(name):
                    t = time.perf_counter()
                    line, _ = c.command(b"DELETE " + quote(name), check=False)  # "Archive" may be \Noselect
                    if name in (SOURCE, TARGET) and line.split()[1:2] == [b"OK"]:
                        self.deletes.append(time.perf_counter() - t)
        for name in self.placements():
            r = self.cli("map", "--config", self.cfg, "unset", USER, name)
            if r.returncode != 0:
                raise RuntimeError(f"map unset {name} failed ({r.returncode}): {r.stderr.strip()}")
        if self.placements():
            raise RuntimeError(f"placements left after map unset: {self.placements()}")
        return time.monotonic() - t0

    def seed(self) -> dict:
        """CREATE "Big" on b1 and fill it with ONE MULTIAPPEND (timed: the write side)."""
        self.c1.command(b"CREATE " + quote(SOURCE))
        self.cpu.start()
        ns, line = self.c1.multiappend(SOURCE, self.body)
        cpu = self.cpu.stop()
        n, size = self.c1.contents(SOURCE)
        if (n, size) != (self.n, self.nbytes):
            raise ProtocolError(f"seed: b1 {SOURCE} holds {n} messages / {size} bytes, expected {self.n} / {self.nbytes}")
        rec = {"seconds": ns / 1e9, "cpu": cpu}
        self.seeds.append(rec)
        log(f"seeded b1 {SOURCE}: {self.n} messages, {self.nbytes / 1e6:.1f} MB in {ns / 1e9:.2f}s "
            f"({self.nbytes / ns * 1e3:.0f} MB/s)")
        return rec

    def reseed(self) -> float:
        t0 = time.monotonic()
        self.reset()
        self.seed()
        return time.monotonic() - t0

    def fetches(self, rounds: int) -> dict:
        """Direct from b1: bulk ``UID FETCH 1:*`` and one UID FETCH per message, alternated."""
        c: Client = self.h.connect("b1", "b1 fetch", cls=Client)  # type: ignore[assignment]
        try:
            if c.examine(SOURCE) != self.n:
                raise ProtocolError(f"b1 {SOURCE} does not hold {self.n} messages")
            c.fetch_all()  # warm-up: the page cache and Dovecot's index, like a first client would
            out: dict[str, list[dict]] = {"bulk": [], "per_message": []}
            for r in range(rounds):
                order = ("bulk", "per_message") if r % 2 == 0 else ("per_message", "bulk")
                for kind in order:
                    self.cpu.start()
                    if kind == "bulk":
                        ns, wire, lit, lits = c.fetch_all()
                    else:
                        ns = wire = lit = lits = 0
                        t0 = time.perf_counter_ns()
                        for uid in range(1, self.n + 1):
                            _, w, lb, ln = c.fetch_all(b"UID FETCH %d BODY.PEEK[]" % uid)
                            wire, lit, lits = wire + w, lit + lb, lits + ln
                        ns = time.perf_counter_ns() - t0
                    cpu = self.cpu.stop()
                    if (lits, lit) != (self.n, self.nbytes):
                        raise ProtocolError(f"FETCH ({kind}) returned {lits} literals / {lit} bytes, "
                                            f"expected {self.n} / {self.nbytes}")
                    out[kind].append({"seconds": ns / 1e9, "wire_bytes": wire, "cpu": cpu})
                    log(f"direct FETCH ({kind}) run {r + 1}: {ns / 1e9:.3f}s, {lit / ns * 1e3:.0f} MB/s")
            c.unselect()
            return out
        finally:
            c.close()
            self.h.clients.remove(c)

    def copies(self, r: int) -> dict:
        """One round of the benchmark's own streamed copies b1 -> b2 (into SCRATCH on b2,
        deleted after each): bulk or per-message FETCH x one MULTIAPPEND or MULTIAPPENDs
        of BATCH_MESSAGES, in an order flipped every round.  {kind: run}"""
        src: Client = self.h.connect("b1", "copy src", cls=Client)  # type: ignore[assignment]
        dst: Client = self.h.connect("b2", "copy dst", cls=Client)  # type: ignore[assignment]
        out: dict[str, dict] = {}
        try:
            if src.examine(SOURCE) != self.n:
                raise ProtocolError(f"b1 {SOURCE} does not hold {self.n} messages")
            for kind in (list(COPIES) if r % 2 == 0 else list(COPIES)[::-1]):
                per_message, batched = COPIES[kind]
                if self.c2.exists(SCRATCH):
                    self.c2.command(b"DELETE " + quote(SCRATCH))
                self.c2.command(b"CREATE " + quote(SCRATCH))
                self.cpu.start()
                ns, msgs, nbytes = stream_copy(src, dst, SCRATCH, self.n, per_message,
                                               BATCH_MESSAGES if batched else self.n)
                cpu = self.cpu.stop()
                got = self.c2.contents(SCRATCH)
                if (msgs, nbytes) != (self.n, self.nbytes) or got != (self.n, self.nbytes):
                    raise ProtocolError(f"copy ({kind}): {msgs} messages / {nbytes} bytes read, {got} on b2, "
                                        f"expected {self.n} / {self.nbytes}")
                self.c2.command(b"DELETE " + quote(SCRATCH))
                out[kind] = {"seconds": ns / 1e9, "cpu": cpu, "round": r + 1}
                log(f"direct copy ({kind}) round {r + 1}: {ns / 1e9:.3f}s, {self.nbytes / ns * 1e3:.0f} MB/s")
            src.unselect()
            return out
        finally:
            for c in (src, dst):
                c.close()
                self.h.clients.remove(c)

    def rename(self, run: int) -> dict:
        """``RENAME Big Archive/Big`` through the proxy, as USER; checked afterwards."""
        c: Client = self.h.connect("proxy", "proxy", cls=Client)  # type: ignore[assignment]
        try:
            self.cpu.start()
            ns, line = c.timed(b"RENAME " + quote(SOURCE) + b" " + quote(TARGET), MOVE_TIMEOUT)
            cpu = self.cpu.stop()
        finally:
            c.close()
            self.h.clients.remove(c)
        if b" OK " not in line[:12]:
            raise ProtocolError(f"proxy RENAME failed: {line[:300]!r}")
        m = _RENAMED.search(line)
        if m and int(m.group(2)) != self.n:
            raise ProtocolError(f"proxy RENAME moved {m.group(2).decode()} messages, expected {self.n}: {line!r}")
        self.check_moved(SOURCE, self.c2, TARGET, "RENAME")
        log(f"proxy RENAME run {run}: {ns / 1e9:.2f}s, {self.nbytes / ns * 1e3:.0f} MB/s; verified on b1/b2")
        return {"seconds": ns / 1e9, "cpu": cpu, "reply": line.decode("utf-8", "replace").strip()}

    def admin_move(self) -> dict:
        """``python -m referral_proxy move --config CFG alice Big b2`` (wall clock of the command)."""
        self.cpu.start()
        t0 = time.perf_counter_ns()
        r = self.cli("move", "--config", self.cfg, USER, SOURCE, "b2", timeout=MOVE_TIMEOUT)
        ns = time.perf_counter_ns() - t0
        cpu = self.cpu.stop()
        if r.returncode != 0:
            raise RuntimeError(f"move failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}")
        m = _MOVED.search(r.stdout)
        # its own timer (from connecting to the backends to the end, without start-up and
        # the STATUS of the progress bar): derived from its MB/s, printed with more digits
        own = self.nbytes / 1e6 / float(m.group(5)) if m and float(m.group(5)) > 0 else None
        if m and int(m.group(2)) != self.n:
            raise ProtocolError(f"move moved {m.group(2)} messages, expected {self.n}: {r.stdout!r}")
        self.check_moved(SOURCE, self.c2, SOURCE, "move")
        log(f"admin move: {ns / 1e9:.2f}s wall clock ({self.nbytes / ns * 1e3:.0f} MB/s)"
            + (f", {own:.1f}s by its own timer" if own is not None else "") + "; verified on b1/b2")
        return {"seconds": ns / 1e9, "own_seconds": own, "cpu": cpu, "stdout": r.stdout.strip()}

    def instrumented_move(self) -> dict:
        """The admin move once more, with timers around its steps (PHASES_CHILD)."""
        out = self.proxy.workdir / "phases.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", PHASES_CHILD, str(out), "move", "--config", self.cfg, USER, SOURCE,
                            "b2"], cwd=self.proxy.workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=MOVE_TIMEOUT, preexec_fn=_pdeathsig)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"instrumented move failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}")
        self.check_moved(SOURCE, self.c2, SOURCE, "instrumented move")
        data = json.loads(out.read_text())
        rows = phases(data, wall)
        log(f"instrumented move: {wall:.2f}s wall clock; verified on b1/b2")
        return {"seconds": wall, "phases": [{"step": a, "seconds": b, "note": c} for a, b, c in rows],
                "events": len(data["events"])}

    def startup_cost(self) -> float:
        """Wall clock of ``map show`` (Python start-up, imports, the config): what any
        run of the command line costs before it moves anything (best of 3)."""
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            self.placements()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        return best or 0.0


# ----------------------------------------------------------------------------- report


def mbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def table(res: dict) -> str:
    p = res["params"]
    nb = p["message_bytes"]
    d = res["derived"]
    best = lambda runs: min(r["seconds"] for r in runs)  # noqa: E731
    fetch_s = best(res["fetch"]["bulk"])
    ren_runs = res["rename"]
    mv = res["move"]

    def row(name: str, seconds: float, cpu: dict | None = None, who: str = "") -> tuple[str, ...]:
        c = ("", "", "") if cpu is None else (f"{cpu['b1']:.2f}", f"{cpu['b2']:.2f}", f"{cpu[who]:.2f}")
        return (name, f"{seconds:.2f}", f"{mbs(nb, seconds):.0f}", f"{fetch_s / seconds:.2f}", *c)

    fetch_best = min(res["fetch"]["bulk"], key=lambda r: r["seconds"])
    body = [row(f"direct UID FETCH 1:* BODY.PEEK[] from b1 (best of {len(res['fetch']['bulk'])})",
                fetch_s, fetch_best["cpu"], "client")]
    for i, r in enumerate(ren_runs, 1):
        body.append(row(f"proxy RENAME {SOURCE} {TARGET}, run {i}", r["seconds"], r["cpu"], "proxy"))
    body.append(row("admin move alice Big b2 (whole command)", mv["seconds"], mv["cpu"], "children"))
    if mv.get("own_seconds"):
        body.append(row("admin move, its own timer (no start-up)", mv["own_seconds"]))
    lines = render_table(("measurement", "seconds", "MB/s", "/FETCH", "CPU b1", "CPU b2", "CPU x"), body)
    lines.append("")
    lines.append(f"RENAME/FETCH = {d['rename_over_fetch']:.2f} (best of {len(ren_runs)} run(s)), "
                 f"move/FETCH = {d['move_over_fetch']:.2f}"
                 + (f" ({d['move_own_over_fetch']:.2f} by the move's own timer)"
                    if d.get("move_own_over_fetch") is not None else ""))
    lines.append("A RENAME to another backend reads every byte from b1 AND writes it to b2 (the proxy copying it"
                 " in between),")
    lines.append("so it cannot beat the FETCH rate; and writing alone (one direct MULTIAPPEND) reaches only"
                 f" {d['append_over_fetch']:.2f} of it, the best")
    lines.append(f"copy b1 -> b2 the benchmark streams itself {d['best_copy_over_fetch']:.2f}: the practical limit"
                 " is near these, not near 1.")
    lines.append("RENAME rate / rate of the best own copy of the same round: "
                 + ", ".join(f"{x:.2f}" for x in d["rename_over_best_copy_same_round"])
                 + " (1 = as fast as a bare copy: no proxy, journal, verification or deletion).")

    lines.append("")
    bd = [(f"direct UID FETCH n BODY.PEEK[] per message from b1 (best of {len(res['fetch']['per_message'])})",
           best(res["fetch"]["per_message"])),
          (f"direct MULTIAPPEND of all to b1 (the seeding, best of {len(res['seed'])})", best(res["seed"]))]
    labels = {
        "bulk_one": "copy b1->b2: 1 UID FETCH 1:*  -> 1 MULTIAPPEND",
        "bulk_batched": f"copy b1->b2: 1 UID FETCH 1:*  -> MULTIAPPENDs of {p['batch_messages']}",
        "per_message_one": "copy b1->b2: UID FETCH per msg -> 1 MULTIAPPEND",
        "per_message_batched": f"copy b1->b2: UID FETCH per msg -> MULTIAPPENDs of {p['batch_messages']} (= proxy)",
    }
    for k, label in labels.items():
        bd.append((f"{label} (best of {len(res['copy'][k])})", best(res["copy"][k])))
    body = [(name, f"{sec:.2f}", f"{mbs(nb, sec):.0f}", f"{fetch_s / sec:.2f}") for name, sec in bd]
    if res["deletes"]:
        body.append((f"direct DELETE of a {p['messages']}-message mailbox (best of {len(res['deletes'])})",
                     f"{min(res['deletes']):.2f}", "", ""))
    body.append(("command-line start-up (map show, best of 3)", f"{d['cli_startup_s']:.2f}", "", ""))
    lines += render_table(("the benchmark's own client, direct to Dovecot", "seconds", "MB/s", "/FETCH"), body)

    ph = res.get("phases")
    if ph:
        lines.append("")
        body = [(r["step"], f"{r['seconds']:.3f}", r["note"]) for r in ph["phases"]]
        lines += render_table((f"admin move with timers ({ph['seconds']:.2f} s wall clock)", "seconds", "note"),
                              body, left=(0, 2))

    lines.append("")
    lines.append(f"Per-message UID FETCHes: direct from b1 they add {d['per_message_fetch_overhead_us']:.0f} us"
                 f" per message ({d['per_message_fetch_extra_s']:+.2f} s for {p['messages']}); in the benchmark's"
                 f" own copy b1 -> b2 {d['per_message_copy_extra_s']:+.2f} s")
    lines.append(f"(per message vs 1 FETCH, one MULTIAPPEND); MULTIAPPENDs of {p['batch_messages']} instead of one:"
                 f" {d['batch_copy_extra_s']:+.2f} s (per-message FETCHes). Negative = lost in the noise.")
    sys_share = [r["cpu"]["b2_sys"] / r["cpu"]["b2"] for r in ren_runs if r["cpu"]["b2"] > 0]
    if sys_share:
        lines.append(f"b2's CPU during the RENAMEs was {min(sys_share):.0%}-{max(sys_share):.0%} system time"
                     " (the kernel creating and filling the message files).")
    lines.append("CPU columns: seconds of CPU during the measurement; b1/b2 = every process of that Dovecot;"
                 " x = this client (FETCH), the proxy (RENAME), the move command (move).")
    lines.append(f"{p['messages']} messages of {p['size']} bytes ({nb / 1e6:.1f} MB); MB/s = message bytes / time"
                 f" (1 MB = 10^6 bytes); /FETCH = rate / direct FETCH rate; CPUs: {res['environment']['cpus']}"
                 + (f", pinned to {','.join(map(str, p['pinned_cpus']))}." if p["pinned_cpus"] else ", not pinned."))
    env = res["environment"]
    lines.append(f"Load average (1 min) before / after: {env['loadavg_before'][0]:.2f} / {env['loadavg_after'][0]:.2f}"
                 " (other work on the machine makes every number here noisy).")
    lines.append(f"RENAME runs: {len(ren_runs)} of {p['renames_asked']} asked"
                 + (f" ({p['renames_note']})" if p.get("renames_note") else "") + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000, help="messages in the mailbox (2000)")
    ap.add_argument("--size", type=int, default=51200, help="bytes per message (51200)")
    ap.add_argument("--fetches", type=int, default=3, help="direct FETCHes of each kind, the best counts (3)")
    ap.add_argument("--renames", type=int, default=2,
                    help="RENAME runs through the proxy if they fit in --budget (2); the first always runs")
    ap.add_argument("--no-phases", action="store_true", help="skip the admin move with timers")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help=f"seconds the whole run should take: further RENAME runs are skipped if they would not "
                         f"fit, and the table says so ({DEFAULT_BUDGET:.0f}; 0 = no limit)")
    ap.add_argument("--pin", metavar="CPUS",
                    help="pin the benchmark, Dovecot and the proxy (they inherit it) to these CPUs, e.g. '0'")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, config, map store)")
    args = ap.parse_args(argv)
    if args.messages < 1 or args.size < 300 or args.fetches < 1 or args.renames < 1:
        ap.error("--messages, --fetches, --renames must be >= 1 and --size >= 300")

    pin = apply_pin(ap, args.pin)
    reason = dovecot_available()
    if reason is not None:
        print(f"bench_rename: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2

    install_signal_handlers()
    proxy_kw = {
        "backend_extra": f'master_user = "{MASTER_USER}"\nmaster_password = "{MASTER_PASSWORD}"\n',
        "map_extra": ('store = "sqlite:map.sqlite3"\n'
                      "\n[[map.rules]]\n"
                      'mailbox = "Archive/*"\n'
                      'backend = "b2"\n'),
    }
    load_before = os.getloadavg()
    with Harness(keep=args.keep, backends=BACKENDS, proxy_kw=proxy_kw) as h:
        h.start()
        assert h.proxy is not None
        bench = Bench(h, args)
        log(f"{args.messages} messages, {bench.nbytes / 1e6:.1f} MB")
        gc.collect()
        gc.disable()
        try:
            bench.reset()
            bench.seed()
            fetch = bench.fetches(args.fetches)
            startup = bench.startup_cost()

            # Rounds: the benchmark's own copies, then the RENAME, then a re-seed: each
            # RENAME has its reference copies next to it (the machine's speed drifts).
            renames: list[dict] = []
            copies: dict[str, list[dict]] = {k: [] for k in COPIES}
            note = ""
            costs: list[float] = []
            while True:
                t0 = time.monotonic()
                for kind, run in bench.copies(len(renames)).items():
                    copies[kind].append(run)
                renames.append(bench.rename(len(renames) + 1))
                costs.append(time.monotonic() - t0 + bench.reseed())
                if len(renames) >= args.renames:
                    break
                # Still to come after another round: the admin move and (unless skipped) the
                # instrumented one, each less than a round; ~5 s to stop.
                per_run = max(costs)
                left = per_run * (2 if args.no_phases else 3) + 5.0
                elapsed = time.monotonic() - h.t_start
                if args.budget > 0 and elapsed + left > args.budget:
                    note = (f"the rest skipped: a round takes {per_run:.0f}s, {elapsed:.0f}s spent, "
                            f"--budget {args.budget:.0f}s")
                    log(f"RENAME: {note}")
                    break
            move = bench.admin_move()
            phases_res = None
            if not args.no_phases:
                bench.reseed()
                phases_res = bench.instrumented_move()
            bench.reset()
        finally:
            gc.enable()

        nb = bench.nbytes
        best = lambda runs: min(r["seconds"] for r in runs)  # noqa: E731
        fetch_s = best(fetch["bulk"])
        ren_s = best(renames)
        extra_fetch = best(fetch["per_message"]) - fetch_s
        results = {
            "params": {
                "messages": args.messages, "size": args.size, "message_bytes": nb,
                "fetches": args.fetches, "renames_asked": args.renames,
                "renames_note": note, "budget_s": args.budget, "batch_messages": BATCH_MESSAGES,
                "pinned_cpus": sorted(pin) if pin else None,
            },
            "environment": {**environment(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "fetch": fetch, "seed": bench.seeds, "copy": copies, "deletes": bench.deletes,
            "rename": renames, "move": move, "phases": phases_res,
            "derived": {
                "fetch_mb_s": mbs(nb, fetch_s),
                "rename_mb_s": mbs(nb, ren_s),
                "move_mb_s": mbs(nb, move["seconds"]),
                "move_own_mb_s": mbs(nb, move["own_seconds"]) if move.get("own_seconds") else None,
                "rename_over_fetch": fetch_s / ren_s,
                "move_over_fetch": fetch_s / move["seconds"],
                "move_own_over_fetch": fetch_s / move["own_seconds"] if move.get("own_seconds") else None,
                "append_over_fetch": fetch_s / best(bench.seeds),
                # per round: the RENAME's rate / the rate of the best of that round's own copies
                "rename_over_best_copy_same_round": [
                    min(runs[i]["seconds"] for runs in copies.values()) / renames[i]["seconds"]
                    for i in range(len(renames))],
                "best_copy_over_fetch": fetch_s / min(best(v) for v in copies.values()),
                "per_message_fetch_extra_s": extra_fetch,
                "per_message_fetch_overhead_us": extra_fetch / args.messages * 1e6,
                "per_message_copy_extra_s": best(copies["per_message_one"]) - best(copies["bulk_one"]),
                "batch_copy_extra_s": best(copies["per_message_batched"]) - best(copies["per_message_one"]),
                "cli_startup_s": startup,
            },
        }
        h.close_clients()
        report(results, table, h.proxy.stderr_text(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("bench_rename", main))
