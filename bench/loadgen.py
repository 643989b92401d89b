#!/usr/bin/env python3
"""A mixed IMAP load generator in the manner of imaptest's default profile.

Many clients (threads in several processes) each run IMAP sessions one after the
other against one server, for a bounded time, and count the commands that
completed (ops) per interval, by command, and the errors.  A session follows
imaptest's default state table (dovecot/imaptest ``src/client-state.c``: the
probabilities of its ``states[]`` and how each state builds its command):

=========  ====  ===============================================================
LOGIN      100%  ``LOGIN "userN" "password"``, a random user of the list
LIST        50%  ``LIST "" *``
STATUS      50%  ``STATUS "INBOX" (MESSAGES UNSEEN RECENT)``
SELECT     100%  ``SELECT "INBOX"``; the rest only if the mailbox has messages
FETCH      100%  ``FETCH <up to 100 random seqs> (1-4 random fields)``: UID, FLAGS,
                 ENVELOPE, INTERNALDATE, BODY, BODYSTRUCTURE, RFC822.SIZE or
                 ``BODY.PEEK[HEADER.FIELDS (1-4 random headers)]``
FETCH2     100%  ``FETCH n (UID <one of BODY.PEEK[HEADER] RFC822.HEADER BODY.PEEK[]
                 BODY.PEEK[1] BODY.PEEK[TEXT]>)``, again with 30% each time
STORE       50%  ``STORE <random seqs> [+|-]FLAGS[.SILENT] (<random flags/keywords>)``
DELETE     100%  ``STORE <random seqs> +FLAGS[.SILENT] \\Deleted`` (more seqs when the
                 mailbox holds more than ``msgs`` + 5 messages)
EXPUNGE    100%  ``EXPUNGE``
APPEND     100%  if the mailbox holds fewer than ``msgs`` (30) messages: ``APPEND
                 "INBOX" [(flags)] ["date"] {n+}`` with LITERAL+, continued as a
                 MULTIAPPEND with 5% after each message
LOGOUT     100%  ``LOGOUT``; the client connects again and starts over
=========  ====  ===============================================================

imaptest's COPY (33%) needs a ``copybox`` and is skipped without one, as here;
SEARCH, SORT, THREAD, NOOP, CHECK, IDLE are 0% by default.  Unlike imaptest this
client never pipelines (imaptest's ``no_pipelining``) and does not check the
server's answers beyond the tagged status (imaptest's ``no_tracking``).  Messages
are generated (1-16 KB, valid RFC 5322), not read from an mbox.

Every command sent is one op when its tagged reply arrives inside a measured
interval; NO/BAD replies and lost connections are errors (counted by command).
Responses are read with the project's codec framer (referral_proxy.imap.framing).

    python bench/loadgen.py --port 1143                     # 20 clients, 3 x 20 s
    python bench/loadgen.py --port 1143 --seconds 5 --intervals 1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from referral_proxy.imap.framing import NEED_DATA, Framer, Line, LineTooLong  # noqa: E402

MAILBOX = "INBOX"
FETCH_FIELDS = ("UID", "FLAGS", "ENVELOPE", "INTERNALDATE", "BODY", "BODYSTRUCTURE", "RFC822.SIZE")
HEADER_FIELDS = ("From", "To", "Cc", "Subject", "References", "In-Reply-To", "Message-ID", "Delivered-To")


def fetch_items(rng: random.Random) -> bytes:
    """The stress mix's FETCH items: 1-4 of FETCH_FIELDS, a quarter of them a HEADER.FIELDS of 1-4 headers."""
    fields = []
    for _ in range(rng.randrange(4) + 1):
        if rng.randrange(4):
            fields.append(rng.choice(FETCH_FIELDS))
        else:
            hdrs = " ".join(rng.choice(HEADER_FIELDS) for _ in range(rng.randrange(4) + 1))
            fields.append(f"BODY.PEEK[HEADER.FIELDS ({hdrs})]")
    return " ".join(fields).encode()
FETCH2_FIELDS = ("BODY.PEEK[HEADER]", "RFC822.HEADER", "BODY.PEEK[]", "BODY.PEEK[1]", "BODY.PEEK[TEXT]")
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Label1", "$Label2", "$Label3", "$Label4", "$Label5")
COMMANDS = ("LOGIN", "LIST", "STATUS", "SELECT", "FETCH", "FETCH2", "STORE", "DELETE", "EXPUNGE",
            "APPEND", "LOGOUT")
MAX_ERROR_SAMPLES = 10

_UNTAGGED_COUNT = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE)\b", re.IGNORECASE)


@dataclass(frozen=True)
class LoadConfig:
    """What to run: where, as whom, how many clients and for how long."""

    host: str
    port: int
    users: tuple[tuple[str, str], ...]
    """(user, password) pairs; each session logs in as a random one."""
    clients: int = 20
    processes: int = 4
    seconds: float = 20.0
    """Length of one measured interval."""
    intervals: int = 3
    warmup: float = 2.0
    """Seconds of load before the first measured interval (connections, caches)."""
    msgs: int = 30
    """imaptest's ``msgs``: APPEND below this many messages, more DELETEs above it + 5."""
    seed: int = 1
    io_timeout: float = 30.0


@dataclass
class LoadResult:
    """Ops per measured interval and what went wrong (all processes together)."""

    config: LoadConfig
    interval_ops: list[int]
    by_command: dict[str, int]
    errors: dict[str, int]
    error_samples: list[str]
    sessions: int
    boundary_times: list[float] = field(default_factory=list)

    @property
    def ops_per_second(self) -> list[float]:
        return [n / self.config.seconds for n in self.interval_ops]

    @property
    def median_ops_per_second(self) -> float:
        return statistics.median(self.ops_per_second)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict:
        c = self.config
        return {
            "params": {"host": c.host, "port": c.port, "users": len(c.users), "clients": c.clients,
                       "processes": c.processes, "seconds": c.seconds, "intervals": c.intervals,
                       "warmup": c.warmup, "msgs": c.msgs, "seed": c.seed},
            "ops_per_second": self.ops_per_second,
            "median_ops_per_second": self.median_ops_per_second,
            "interval_ops": self.interval_ops,
            "by_command": self.by_command,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "sessions": self.sessions,
        }


def numbered_users(template: str, count: int, password: str) -> tuple[tuple[str, str], ...]:
    """imaptest's ``user=user%d users=100``: user1..user100, one password."""
    return tuple((template % i if "%d" in template else template, password) for i in range(1, count + 1))


# ----------------------------------------------------------------------------- messages


def make_messages(count: int, rng: random.Random) -> list[bytes]:
    """*count* valid RFC 5322 messages of 1-16 KB (most near 4 KB), CRLF line ends."""
    out = []
    for i in range(count):
        size = int(min(16384, max(1024, rng.lognormvariate(8.3, 0.6))))
        head = (f"Date: Mon, 01 Jan 2024 00:00:{i % 60:02d} +0000\r\n"
                f"From: Load <load@bench.example>\r\nTo: User <user@bench.example>\r\n"
                f"Subject: load message {i}\r\nMessage-ID: <load-{i}-{rng.getrandbits(32)}@bench.example>\r\n"
                f"\r\n").encode()
        line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnop\r\n"
        body = line * max(1, (size - len(head)) // len(line))
        out.append(head + body)
    return out


# ----------------------------------------------------------------------------- one client


class SessionError(Exception):
    """The connection is unusable (closed, timed out, framing error): start a new session."""


class Client:
    """One simulated client: sessions one after the other until the deadline."""

    def __init__(self, cfg: LoadConfig, index: int, t_measure: float, messages: list[bytes]) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed * 1_000_003 + index)
        self.t_measure = t_measure
        self.t_end = t_measure + cfg.seconds * cfg.intervals
        self.messages = messages
        self.interval_ops = [0] * cfg.intervals
        self.by_command: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.sessions = 0
        self.sock: socket.socket | None = None
        self.framer = Framer(1 << 20, auto_accept=True)
        self.exists = 0
        self.n = 0

    # -- bookkeeping

    def _done(self, name: str, t: float) -> None:
        if self.t_measure <= t < self.t_end:
            self.interval_ops[int((t - self.t_measure) / self.cfg.seconds)] += 1
            self.by_command[name] += 1

    def _error(self, name: str, text: str) -> None:
        if time.monotonic() < self.t_end:
            self.errors[name] += 1
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(f"{name}: {text[:200]}")

    # -- wire

    def _events(self):
        """Framer events as they arrive (blocking)."""
        framer = self.framer
        sock = self.sock
        assert sock is not None
        while True:
            ev = framer.next_event()
            if ev is NEED_DATA:
                try:
                    data = sock.recv(262144)
                except OSError as e:
                    raise SessionError(f"recv: {e}") from None
                if not data:
                    raise SessionError("connection closed by the server")
                framer.receive_data(data)
                continue
            yield ev

    def _read_tagged(self, tag: bytes) -> bytes:
        """Read to the tagged reply of *tag*, tracking EXISTS/EXPUNGE; the tagged line."""
        prefix = tag + b" "
        for ev in self._events():
            if type(ev) is Line:
                if not ev.first:
                    continue
                data = ev.data
                if data.startswith(prefix):
                    return data
                if data.startswith(b"* "):
                    m = _UNTAGGED_COUNT.match(data)
                    if m:
                        if m.group(2).upper() == b"EXISTS":
                            self.exists = int(m.group(1))
                        else:
                            self.exists -= 1
            elif isinstance(ev, LineTooLong):
                raise SessionError("response line too long")
        raise SessionError("no tagged reply")  # pragma: no cover - _events never ends

    def command(self, name: str, text: bytes) -> bool:
        """Send ``tag text`` (text may carry LITERAL+ literals), read the reply: True if OK."""
        self.n += 1
        tag = b"c%d" % self.n
        try:
            self.sock.sendall(tag + b" " + text + b"\r\n")  # type: ignore[union-attr]
        except OSError as e:
            raise SessionError(f"send: {e}") from None
        line = self._read_tagged(tag)
        t = time.monotonic()
        status = line[len(tag) + 1:len(tag) + 4].upper()
        if status == b"OK " or line[len(tag) + 1:].upper() == b"OK":
            self._done(name, t)
            return True
        self._error(name, line.decode("utf-8", "replace"))
        return False

    # -- the session

    def _rand(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent

    def _seqset(self, count: int, msgs: int) -> bytes:
        seqs = sorted({self.rng.randrange(msgs) + 1 for _ in range(count)})
        parts = []
        start = prev = seqs[0]
        for s in seqs[1:]:
            if s != prev + 1:
                parts.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
                start = s
            prev = s
        parts.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        return b",".join(parts)

    def _flags(self) -> bytes:
        k = self.rng.randrange(4)
        return " ".join(self.rng.sample(FLAGS, k)).encode()

    def _append_part(self) -> bytes:
        msg = self.rng.choice(self.messages)
        parts = []
        if self._rand(50):
            parts.append(b" (" + self._flags() + b")")
        if self._rand(50):
            parts.append(b' "01-Jan-2024 00:00:00 +0000"')
        parts.append(b" {%d+}\r\n" % len(msg))
        return b"".join(parts) + msg

    def session(self) -> None:
        cfg = self.cfg
        rng = self.rng
        self.framer = Framer(1 << 20, auto_accept=True)
        self.exists = 0
        try:
            self.sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.io_timeout)
        except OSError as e:
            self._error("CONNECT", str(e))
            time.sleep(0.1)
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for ev in self._events():
                if type(ev) is Line:
                    if not ev.data.startswith(b"* OK"):
                        self._error("GREETING", ev.data.decode("utf-8", "replace"))
                        return
                    break
            self.sessions += 1
            user, password = rng.choice(cfg.users)
            if not self.command("LOGIN", b'LOGIN "%s" "%s"' % (user.encode(), password.encode())):
                return
            if self._rand(50):
                self.command("LIST", b'LIST "" *')
            if self._rand(50):
                self.command("STATUS", b'STATUS "%s" (MESSAGES UNSEEN RECENT)' % MAILBOX.encode())
            if not self.command("SELECT", b'SELECT "%s"' % MAILBOX.encode()):
                self.command("LOGOUT", b"LOGOUT")
                return
            if self.exists > 0:
                seqs = self._seqset(min(self.exists, 100), self.exists)
                self.command("FETCH", b"FETCH " + seqs + b" (" + fetch_items(rng) + b")")
            while self.exists > 0:
                n = rng.randrange(self.exists) + 1
                self.command("FETCH2", b"FETCH %d (UID %s)" % (n, rng.choice(FETCH2_FIELDS).encode()))
                if not self._rand(30):
                    break
            msgs = self.exists
            if msgs > 0 and self._rand(50):
                count = rng.randrange(msgs if msgs < 10 else min(msgs // 5, 50)) if msgs > 1 else 0
                if count:
                    kind = rng.choice((b"+", b"-", b""))
                    silent = b".SILENT" if rng.randrange(2) else b""
                    self.command("STORE", b"STORE %s %sFLAGS%s (%s)" % (self._seqset(count, msgs), kind, silent,
                                                                        self._flags()))
            msgs = self.exists
            if msgs > 0:
                count = rng.randrange(msgs - cfg.msgs) if msgs > cfg.msgs + 5 else rng.randrange(5)
                if count:
                    silent = b".SILENT" if rng.randrange(2) else b""
                    self.command("DELETE", b"STORE %s +FLAGS%s \\Deleted" % (self._seqset(count, msgs), silent))
                self.command("EXPUNGE", b"EXPUNGE")
            if self.exists < cfg.msgs:
                text = b'APPEND "%s"' % MAILBOX.encode() + self._append_part()
                while self._rand(5):
                    text += self._append_part()
                self.command("APPEND", text)
            self.command("LOGOUT", b"LOGOUT")
        except SessionError as e:
            self._error("CONNECTION", str(e))
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def run(self) -> None:
        while time.monotonic() < self.t_end:
            self.session()


# ----------------------------------------------------------------------------- processes


def _worker(cfg: LoadConfig, first: int, count: int, t_measure: float, conn) -> None:
    """One process: *count* clients as threads; sends its totals through *conn*."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: terminate() ends it
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # die with the parent
    rng = random.Random(cfg.seed)
    messages = make_messages(64, rng)
    clients = [Client(cfg, first + i, t_measure, messages) for i in range(count)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {
        "interval_ops": [sum(c.interval_ops[i] for c in clients) for i in range(cfg.intervals)],
        "by_command": dict(sum((c.by_command for c in clients), Counter())),
        "errors": dict(sum((c.errors for c in clients), Counter())),
        "error_samples": [s for c in clients for s in c.error_samples][:MAX_ERROR_SAMPLES],
        "sessions": sum(c.sessions for c in clients),
    }
    conn.send(out)
    conn.close()


def run_load(cfg: LoadConfig, on_boundary: Callable[[int], None] | None = None) -> LoadResult:
    """Run the load; ``on_boundary(i)`` is called at the start of measured interval i and,
    with i = intervals, at the end (to sample e.g. CPU times at the same instants)."""
    if cfg.clients < 1 or cfg.processes < 1 or cfg.intervals < 1 or cfg.seconds <= 0 or not cfg.users:
        raise ValueError("clients, processes, intervals >= 1, seconds > 0 and at least one user")
    ctx = multiprocessing.get_context("fork")
    nproc = min(cfg.processes, cfg.clients)
    t_measure = time.monotonic() + 0.2 + cfg.warmup
    procs = []
    pipes = []
    first = 0
    try:
        for p in range(nproc):
            count = cfg.clients // nproc + (1 if p < cfg.clients % nproc else 0)
            r, w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(cfg, first, count, t_measure, w), daemon=True)
            proc.start()
            w.close()
            procs.append(proc)
            pipes.append(r)
            first += count
        times = []
        for i in range(cfg.intervals + 1):
            wait = t_measure + i * cfg.seconds - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            times.append(time.monotonic())
            if on_boundary is not None:
                on_boundary(i)
        results = []
        for proc, r in zip(procs, pipes):
            if not r.poll(cfg.io_timeout + 10):
                raise RuntimeError(f"load process {proc.pid} did not finish")
            results.append(r.recv())
            proc.join(5)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    by_command: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for res in results:
        by_command.update(res["by_command"])
        errors.update(res["errors"])
    return LoadResult(
        config=cfg,
        interval_ops=[sum(res["interval_ops"][i] for res in results) for i in range(cfg.intervals)],
        by_command={k: by_command.get(k, 0) for k in COMMANDS},
        errors=dict(errors),
        error_samples=[s for res in results for s in res["error_samples"]][:MAX_ERROR_SAMPLES],
        sessions=sum(res["sessions"] for res in results),
        boundary_times=times,
    )


def format_result(res: LoadResult) -> str:
    """Human-readable summary: ops/s per interval, the mix, the errors."""
    c = res.config
    lines = [f"{c.clients} clients in {min(c.processes, c.clients)} processes, {len(c.users)} users, "
             f"{c.intervals} x {c.seconds:g} s against {c.host}:{c.port}",
             "ops/s per interval: " + ", ".join(f"{v:.0f}" for v in res.ops_per_second)
             + f"  (median {res.median_ops_per_second:.0f})",
             f"sessions: {res.sessions}; ops by command: "
             + ", ".join(f"{k} {v}" for k, v in res.by_command.items())]
    if res.errors:
        lines.append(f"errors: {res.error_count} (" + ", ".join(f"{k} {v}" for k, v in res.errors.items()) + ")")
        lines += [f"  e.g. {s}" for s in res.error_samples[:3]]
    else:
        lines.append("errors: 0")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user-template", default="user%d", help="imaptest's user=: %%d = 1..--users (user%%d)")
    ap.add_argument("--users", type=int, default=100, help="how many users (100)")
    ap.add_argument("--password", default="secret", help="every user's password (secret)")
    ap.add_argument("--clients", type=int, default=20, help="simultaneous clients (20)")
    ap.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1) * 2,
                    help="processes the clients are spread over (2 x CPUs, at most 8)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of a measured interval (20)")
    ap.add_argument("--intervals", type=int, default=3, help="measured intervals (3)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    ap.add_argument("--msgs", type=int, default=30, help="imaptest's msgs: mailbox size kept near this (30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.processes < 1 or args.intervals < 1 or args.seconds <= 0 or args.users < 1:
        ap.error("--clients, --processes, --intervals, --users must be >= 1 and --seconds > 0")
    cfg = LoadConfig(host=args.host, port=args.port,
                     users=numbered_users(args.user_template, args.users, args.password),
                     clients=args.clients, processes=args.processes, seconds=args.seconds,
                     intervals=args.intervals, warmup=args.warmup, msgs=args.msgs, seed=args.seed)
    try:
        res = run_load(cfg)
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return 0 if res.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
