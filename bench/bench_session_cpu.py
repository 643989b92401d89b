#!/usr/bin/env python3
"""Python CPU time the session spends on one relayed command, in memory (no sockets).

A ClientSession on Twisted's in-memory transports with a scripted backend
(referral_proxy.testing.fakes): each round sends one command from the client and
its completion from the backend. CPU time (process_time), best of --rounds, per
command. ``--tree DIR`` measures another checkout (e.g. the main branch before a
change) the same way, so two trees can be compared in turns on one machine:

    python bench/bench_session_cpu.py --tree /path/to/old/checkout
    python bench/bench_session_cpu.py

``--instructions`` counts instead, exactly, what the CPU time measures noisily: the
instructions per command under valgrind (callgrind), ``(Ir(count) - Ir(0)) / count``,
so that start-up and imports cancel out (valgrind installed; ~2 min per command):

    python bench/bench_session_cpu.py --instructions --count 2000 [--tree ...]

The last case is a whole session instead of one command (accept, greeting, LOGIN, SELECT,
LOGOUT, both sides closed, its three log lines written; the collector on, since what a
session leaves to it is part of its cost), run ``--count / 10`` times.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HEADER = (b"Return-Path: <alice@example.org>\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.org\r\n"
           b"Subject: the quarterly figures\r\nDate: Mon, 30 Nov 2026 12:00:00 +0000\r\n"
           b"Message-ID: <20261130120000.1@example.org>\r\n\r\n")

_ENVELOPE = (b'* %d FETCH (UID %d FLAGS (\\Seen) ENVELOPE ("Mon, 30 Nov 2026 12:00:00 +0000" "the quarterly figures" '
             b'(("Alice" NIL "alice" "example.org")) (("Alice" NIL "alice" "example.org")) '
             b'(("Alice" NIL "alice" "example.org")) ((NIL NIL "bob" "example.org")) NIL NIL NIL '
             b'"<20261130120000.%d@example.org>"))\r\n')
_ENVELOPES = b"".join(_ENVELOPE % (i, i, i) for i in range(1, 31)).replace(b"%", b"%%")

COMMANDS = [
    ("NOOP", b"NOOP", b"rp%d OK NOOP completed.\r\n"),
    ("UID FETCH", b"UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
     b"* 1 FETCH (FLAGS (\\Seen) UID 1)\r\nrp%d OK done\r\n"),
    ("SEARCH literal", b"SEARCH TEXT {5+}\r\nhello", b"* SEARCH 1\r\nrp%d OK done\r\n"),
    ("UID STORE", b"UID STORE 5 +FLAGS.SILENT (\\Deleted)", b"rp%d OK Store completed.\r\n"),
    # An answer with a literal (imaptest's FETCH2): the untagged FETCH and its body, then OK, in one read.
    ("FETCH literal", b"FETCH 3 (UID BODY.PEEK[HEADER])",
     b"* 3 FETCH (UID 3 BODY[HEADER] {%d}\r\n" % len(_HEADER) + _HEADER.replace(b"%", b"%%")
     + b")\r\nrp%d OK Fetch completed (0.001 + 0.000 secs).\r\n"),
    # Dovecot's SELECT answer: untagged data with response codes, a completion with [READ-WRITE].
    ("SELECT", b"SELECT INBOX",
     b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
     b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n"
     b"* 30 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1764500000] UIDs valid\r\n"
     b"* OK [UIDNEXT 31] Predicted next UID\r\n"
     b"rp%d OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"),
    # The stress mix's LIST and STATUS (one mailbox; fastnames.py): Dovecot's answers.
    ("LIST", b'LIST "" *', b'* LIST (\\HasNoChildren) "/" INBOX\r\nrp%d OK List completed (0.001 + 0.000 secs).\r\n'),
    ("STATUS", b'STATUS "INBOX" (MESSAGES UNSEEN RECENT)',
     b"* STATUS INBOX (MESSAGES 30 RECENT 0 UNSEEN 30)\r\nrp%d OK Status completed (0.001 + 0.000 secs).\r\n"),
    # imaptest's STORE without .SILENT: 30 untagged FETCH lines and the completion in one read.
    ("STORE 30, 1 read", b"STORE 1:30 +FLAGS (\\Seen)",
     b"".join(b"* %d FETCH (FLAGS (\\Seen \\Deleted))\r\n" % i for i in range(1, 31)).replace(b"%", b"%%")
     + b"rp%d OK Store completed.\r\n"),
    # imaptest's FETCH: 30 messages' ENVELOPEs (8 KB), the backend's answer in three reads cut mid-line.
    ("FETCH 30, 3 reads", b"FETCH 1:30 (UID FLAGS ENVELOPE)", _ENVELOPES + b"rp%d OK Fetch completed.\r\n",
     (len(_ENVELOPES) // 3 + 7, 2 * len(_ENVELOPES) // 3 + 11)),
]


_SELECTED = (b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 30 EXISTS\r\n* 0 RECENT\r\n"
             b"* OK [UIDVALIDITY 1764500000] UIDs valid\r\n%s OK [READ-WRITE] Select completed.\r\n")


def _address(port: int) -> Any:
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", "127.0.0.1", port)


_PEER, _HOST = _address(40000), _address(1143)


def measure(count: int, command: bytes, response: bytes, check: Callable[[Any], None] | None = None,
            cuts: tuple[int, ...] = ()) -> float:
    """CPU microseconds per command; *check(harness)* is called at the end (bench_metrics_cost.py);
    *cuts*: where the backend's answer is cut into reads."""
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
        answer = response % (i + 2)
        if cuts:
            for a, b in zip((0, *cuts), (*cuts, len(answer))):
                backend.dataReceived(answer[a:b])
        else:
            backend.dataReceived(answer)
        h.client.clear()
        backend.transport.clear()
    t1 = time.process_time()
    gc.enable()
    if check is not None:
        check(h)
    return (t1 - t0) / max(count, 1) * 1e6


SESSION = "whole session"  # accept, greeting, LOGIN, SELECT, LOGOUT, both sides closed; log lines written


def measure_session(count: int) -> float:
    """CPU microseconds per whole session on one context (the collector on, as in the proxy:
    what a session leaves to it is part of its cost), its log lines written to memory."""
    import io

    from twisted.internet.error import ConnectionDone
    from twisted.logger import globalLogBeginner, globalLogPublisher
    from twisted.python.failure import Failure

    from referral_proxy.logs import LogWriter
    from referral_proxy.session import ClientSession
    from referral_proxy.testing.fakes import NoDelayTransport, SessionHarness

    h = SessionHarness()
    sink = io.StringIO()
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)  # once a process: no-op after
    writer = LogWriter(h.config.log, sink, context=h.context.observer.context)
    globalLogPublisher.addObserver(writer)
    done = Failure(ConnectionDone())

    def one() -> None:
        h.session = ClientSession(h.context)
        h.client = NoDelayTransport(peerAddress=_PEER, hostAddress=_HOST)
        h.session.makeConnection(h.client)
        h.login()
        h.send(b"s SELECT INBOX\r\n")
        tag = h.to_backend().split(b" ", 1)[0]
        h.from_backend(_SELECTED % tag)
        h.send(b"o LOGOUT\r\n")  # the backend's LOGOUT is not waited for
        h.session.connectionLost(done)
        h.backend.connectionLost(done)
        h.turns()
        h.connector.backends.clear()
        h.connector.credentials.clear()
        sink.seek(0)
        sink.truncate()

    one()
    t0 = time.process_time()
    for _ in range(count):
        one()
    t1 = time.process_time()
    globalLogPublisher.removeObserver(writer)
    return (t1 - t0) / max(count, 1) * 1e6


def instructions(tree: str, count: int, index: int) -> int:
    """Instructions callgrind counts for this script running *count* commands of COMMANDS[index]."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", os.path.realpath(sys.executable),
                          __file__, "--tree", tree, "--count", str(count), "--only", str(index)],
                         capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise SystemExit(f"no instruction count from valgrind: {out[-500:]}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instructions", action="store_true", help="instructions per command (valgrind)")
    ap.add_argument("--only", type=int, help=argparse.SUPPRESS)  # one run of COMMANDS[i], under valgrind
    args = ap.parse_args()
    if args.instructions:
        base = instructions(args.tree, 0, 0)
        for i, (name, *_rest) in enumerate(COMMANDS):
            per = (instructions(args.tree, args.count, i) - base) / args.count
            print(f"{name:16s} {per / 1000:7.1f}k instructions per command")
        count = max(args.count // 10, 1)  # a session is ~30 commands' worth
        base = instructions(args.tree, 0, len(COMMANDS))
        per = (instructions(args.tree, count, len(COMMANDS)) - base) / count
        print(f"{SESSION:16s} {per / 1000:7.1f}k instructions per session")
        return 0
    sys.path.insert(0, args.tree)
    if args.only == len(COMMANDS):
        measure_session(args.count)
        return 0
    if args.only is not None:
        _name, command, response, *cuts = COMMANDS[args.only]
        measure(args.count, command, response, None, *cuts)
        return 0
    for name, command, response, *cuts in COMMANDS:
        best = min(measure(args.count, command, response, None, *cuts) for _ in range(args.rounds))
        print(f"{name:16s} {best:7.2f} us CPU per command")
    best = min(measure_session(max(args.count // 10, 1)) for _ in range(args.rounds))
    print(f"{SESSION:16s} {best:7.2f} us CPU per session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
