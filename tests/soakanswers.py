"""What the soak's clients were answered, command by command, and how long they waited for it.

The soak (tests/soak.py) judges mail by a census, never by the proxy's answers; so a proxy that
refuses far too often (every COPY/MOVE ``NO [INUSE]`` after transfer.MOVE_WAIT, copywait.py) or
never waits keeps every message in place and passes unseen. This counts every COPY / MOVE (and the
oldmove steps, APPENDs, RENAMEs) by its outcome -- OK, NO by response code, BAD, no answer -- and
records the longest wait and how many waited more than :data:`SLOW` seconds, so that both show in
the soak's summary lines (:meth:`Answers.text`) and add up over runs (:func:`parse`, and
tests/soaktotals.py for the loops' summary files).

The text is appended after the soak's own figures ("lost N, duplicated N, ..." stay first and
unchanged: the lead's scripts grep them) and uses none of their words.
"""

from __future__ import annotations

import collections
import imaplib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SLOW = 5.0  # seconds: a wait longer than this is counted (transfer.MOVE_WAIT is 10 s)
#: The commands counted, in the order they are printed (OLDMOVE-*: the steps of a move the RFC 3501 way).
COMMANDS = ("COPY", "MOVE", "OLDMOVE-COPY", "OLDMOVE-STORE", "OLDMOVE-EXPUNGE", "APPEND", "RENAME")
REFUSAL = 90  # characters of a refusal's text kept (Answers.refusals)
TIMINGS = re.compile(r" \([0-9.+ ]+ secs\)\.?$")  # Dovecot's, at the end of its answers' texts
CUT = "cut"  # no answer: the connection dropped (a kill) before the tagged answer
TIMEOUT = "timeout"  # no answer within the client's socket timeout


def outcome(typ: str, data: list) -> str:
    """An answer's outcome: ``OK``, ``NO``, ``NO[CODE]`` (its response code's name: INUSE, TRYCREATE...)."""
    if typ != "NO":
        return typ
    text = next((d for d in data if isinstance(d, bytes)), b"")
    code = re.match(rb"\[([A-Za-z0-9-]+)", text)
    return f"NO[{code[1].decode().upper()}]" if code else "NO"


def failure(e: BaseException) -> str:
    """The outcome of a command imaplib raised on (see imaplib.IMAP4._command_complete)."""
    if isinstance(e, TimeoutError):
        return TIMEOUT
    if isinstance(e, imaplib.IMAP4.readonly):
        return "READ-ONLY"
    if isinstance(e, (imaplib.IMAP4.abort, OSError, EOFError)):
        return CUT
    if isinstance(e, imaplib.IMAP4.error) and " command error: BAD " in str(e):
        return "BAD"
    return "error"


@dataclass
class Answers:
    """Counts of (command, outcome), and per command the longest wait and the waits over :data:`SLOW`
    (answered or not: a cut after a long wait was a long wait). Thread-safe."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    longest: dict = field(default_factory=dict)  # command -> seconds
    slow: collections.Counter = field(default_factory=collections.Counter)  # command -> waits over SLOW
    #: (command, the refusal's text) of NOs and BADs: which of the proxy's refusals it was (the run's log only)
    refusals: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, command: str, result: str, waited: float, text: str = "") -> None:
        with self.lock:
            self.counts[command, result] += 1
            if text:
                self.refusals[command, text] += 1
            self.longest[command] = max(self.longest.get(command, 0.0), waited)
            if waited > SLOW:
                self.slow[command] += 1

    def ask(self, command: str, call: Callable[[], tuple[str, list]]) -> tuple[str, list]:
        """``call()`` (one imaplib command), its answer recorded under *command*; what it raises, re-raised."""
        since = time.monotonic()
        try:
            typ, data = call()
        except BaseException as e:
            result = failure(e)
            bad = re.sub(r"^.*? command error: BAD \[b?['\"](.*)['\"]\]$", r"\1", str(e))
            self.record(command, result, time.monotonic() - since, _refusal("BAD", bad) if result == "BAD" else "")
            raise
        text = next((d for d in data if isinstance(d, bytes)), b"").decode(errors="replace")
        self.record(command, outcome(typ, data), time.monotonic() - since, _refusal("NO", text) if typ == "NO" else "")
        return typ, data

    def update(self, other: Answers) -> None:
        """Add *other*'s figures (the totals over runs)."""
        with self.lock:
            self.counts.update(other.counts)
            self.slow.update(other.slow)
            self.refusals.update(other.refusals)
            for command, waited in other.longest.items():
                self.longest[command] = max(self.longest.get(command, 0.0), waited)

    def refused(self, most: int = 8) -> str:
        """The commonest refusals: ``3x COPY NO [INUSE] Messages of a mailbox involved are ...; ...``."""
        with self.lock:
            return "; ".join(f"{n}x {command} {text}" for (command, text), n in self.refusals.most_common(most))

    def text(self) -> str:
        """``answers: COPY OK 49 NO[INUSE] 3 cut 1 (max 10.2 s, 2 over 5 s); MOVE ...``
        (commands never sent: left out)."""
        with self.lock:
            groups = []
            for command in sorted({c for c, _ in self.counts}, key=_order):
                results = sorted(((r, n) for (c, r), n in self.counts.items() if c == command), key=_result_order)
                groups.append(f"{command} " + " ".join(f"{r} {n}" for r, n in results)
                              + f" (max {self.longest.get(command, 0.0):.1f} s, {self.slow[command]} over {SLOW:g} s)")
        return "answers: " + ("; ".join(groups) if groups else "none")


def _refusal(typ: str, text: str) -> str:
    """``NO text``, short, without Dovecot's timings (" (0.001 + 0.000 secs).": one refusal, one text)."""
    return (typ + " " + TIMINGS.sub("", text))[:REFUSAL]


def _order(command: str) -> tuple[int, str]:
    return (COMMANDS.index(command) if command in COMMANDS else len(COMMANDS), command)


def _result_order(item: tuple[str, int]) -> tuple[int, str]:
    result = item[0]
    rank = {"OK": 0, "NO": 2, "BAD": 3, CUT: 4, TIMEOUT: 5}.get(result, 1 if result.startswith("NO[") else 6)
    return (rank, result)


GROUP = re.compile(r"(?P<command>[A-Z-]+) (?P<results>(?:\S+ \d+ )*)"
                   r"\(max (?P<max>[\d.]+) s, (?P<slow>\d+) over [\d.]+ s\)")


def parse(line: str) -> Answers:
    """The figures of an :meth:`Answers.text` found in *line* (none: empty Answers)."""
    answers = Answers()
    at = line.find("answers: ")
    if at < 0:
        return answers
    for group in GROUP.finditer(line[at + len("answers: "):]):
        command = group["command"]
        pairs = group["results"].split()
        for result, n in zip(pairs[::2], pairs[1::2]):
            answers.counts[command, result] += int(n)
        answers.longest[command] = float(group["max"])
        answers.slow[command] += int(group["slow"])
    return answers


ANSWER = re.compile(r"(.*?): (?:OK|NO|BAD|cut|connection|error|lost|timeout)")


def long_waits(history: list, limit: float, stall: float) -> list[str]:
    """The requests of the soak's history (time, client, what) answered more than *limit* seconds after they were
    sent, each with the backends SIGKILLed in the *stall* seconds before it: a Dovecot waiting on a lock a killed
    Dovecot left (up to ~120 s) explains such a wait; one with no kill before it is the proxy's to explain."""
    pending: dict = {}
    kills = [(t, what.split()[1]) for t, who, what in history if who == -1 and what.startswith("KILL b")]
    out = []
    for t, who, what in history:
        if who == -1:
            continue
        answered = ANSWER.match(what)
        if answered is None or who not in pending:
            pending[who] = (t, what)
            continue
        start, request = pending.pop(who)
        if t - start > limit:
            near = ", ".join(f"{b} {t0 - start:+.1f} s" for t0, b in kills if start - stall <= t0 <= t) or "none"
            out.append(f"c{who} {request[:120]!r} waited {t - start:.1f} s ({what[len(answered[1]) + 2:][:60]}); "
                       f"backend kills around it: {near}")
    return out
