"""An APPEND to A/B/x while another session RENAMEs A/B (or A, or DELETEs A/B/x): what is the answer,
and is the message there? Counted per round: OK + present, NO + absent (both true), NO + PRESENT (the
client APPENDs again: the message twice), OK + absent (lost).

Not collected (a fact about the backend, and the rounds the proxy's tests reuse):
``python3 tests/dovecot_append_rename_race.py [rounds] [op]`` (op: rename-parent, rename-grand, delete-box,
delete-parent; default all). Direct Dovecot 2.3.19.1, maildir: see the numbers in the commit that added it.
:func:`one_round` talks to any IMAP address: tests/test_append_rename_race.py runs it through the proxy.
"""

from __future__ import annotations

import collections
import random
import sys
import threading
import time

from imapwire import Wire

OPS = ("rename-parent", "rename-grand", "delete-box", "delete-parent")


def quoted(name: str) -> bytes:
    return b'"' + name.encode("utf-8", "surrogateescape").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def body(mid: str, size: int) -> bytes:
    head = b"Message-ID: <%s>\r\nSubject: race\r\n\r\n" % mid.encode()
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def names(i: int, top: str = "A") -> tuple[str, str]:
    """The round's parent (A{i}/B{i}; INBOX/S{i}) and the mailbox APPENDed to (its child x)."""
    parent = f"INBOX/S{i}" if top == "INBOX" else f"{top}{i}/B{i}"
    return parent, parent + "/x"


def _append(w: Wire, box: str, data: bytes, plus: bool, tag: bytes = b"a") -> bytes:
    if plus:
        w.send(tag + b" APPEND " + quoted(box) + b" {%d+}\r\n" % len(data) + data + b"\r\n")
        return w.until_tagged(tag)[-1]
    w.send(tag + b" APPEND " + quoted(box) + b" {%d}\r\n" % len(data))
    first = w.line()
    if not first.startswith(b"+"):
        return first if first.startswith(tag + b" ") else w.until_tagged(tag)[-1]
    for k in range(0, len(data), 65536):
        w.send(data[k:k + 65536])
    w.send(b"\r\n")
    return w.until_tagged(tag)[-1]


def _multiappend(w: Wire, box: str, datas: list[bytes], tag: bytes = b"a") -> bytes:
    w.send(tag + b" APPEND " + quoted(box) + b"".join(b" {%d+}\r\n" % len(d) + d for d in datas) + b"\r\n")
    return w.until_tagged(tag)[-1]


def count(w: Wire, mailboxes: list[str], mid: str) -> int:
    """Copies of *mid* in *mailboxes* (those that exist)."""
    found = 0
    for box in mailboxes:
        if not w.cmd(b"e", b"EXAMINE " + quoted(box))[-1].startswith(b"e OK"):
            continue
        for line in w.cmd(b"s", b'SEARCH HEADER Message-ID "<%s>"' % mid.encode()):
            if line.startswith(b"* SEARCH"):
                found += len(line.split()) - 2
    w.cmd(b"u", b"CLOSE")
    return found


def _session(addr: tuple[str, int], user: str, password: str, utf8: bool) -> Wire:
    w = Wire(*addr, timeout=120)
    w.login(user, password)
    if utf8:  # an 8-bit name: RFC 6855 (Dovecot refuses it otherwise)
        assert w.cmd(b"u", b"ENABLE UTF8=ACCEPT")[-1].startswith(b"u OK")
    return w


def one_round(addr: tuple[str, int], user: str, i: int, op: str, size: int, plus: bool, delay: float,
              top: str = "A", appended_as: str | None = None, messages: int = 1, password: str = "secret",
              other_addr: tuple[str, int] | None = None) -> tuple[bytes, int, bytes]:
    """One race; returns (the APPEND's answer, copies present, messages per copy expected).

    *appended_as*: the name the APPEND uses (another case of INBOX); *messages* > 1: one MULTIAPPEND."""
    parent, box = names(i, top)
    utf8 = not top.isascii()
    control = _session(addr, user, password, utf8)
    assert control.cmd(b"c", b"CREATE " + quoted(box))[-1].startswith(b"c OK")
    first, _, _ = parent.partition("/")
    renamed = f"P{i}"
    if op == "rename-parent":
        other = b"r RENAME " + quoted(parent) + b" " + quoted(renamed) + b"\r\n"
        after = [box, renamed + "/x"]
    elif op == "rename-grand":
        other = b"r RENAME " + quoted(first) + b" " + quoted(renamed) + b"\r\n"
        after = [box, renamed + box[len(first):]]
    elif op == "delete-box":
        other = b"r DELETE " + quoted(box) + b"\r\n"
        after = [box]
    else:
        other = b"r DELETE " + quoted(parent) + b"\r\n"  # Dovecot: a parent with children is \Noselect'ed
        after = [box]
    mids = [f"r{i}-{k}-{random.getrandbits(32):x}@race" for k in range(messages)]
    datas = [body(m, size) for m in mids]
    appender, renamer = _session(addr, user, password, utf8), _session(other_addr or addr, user, password, utf8)
    answers: list[bytes] = [b"", b""]
    barrier = threading.Barrier(2)
    target = appended_as + box[len(first):] if appended_as else box

    def append_side() -> None:
        barrier.wait()
        if messages > 1:
            answers[0] = _multiappend(appender, target, datas)
        else:
            answers[0] = _append(appender, target, datas[0], plus)

    def rename_side() -> None:
        barrier.wait()
        time.sleep(delay)
        renamer.send(other)
        answers[1] = renamer.until_tagged(b"r")[-1]

    sides = [threading.Thread(target=append_side), threading.Thread(target=rename_side)]
    for t in sides:
        t.start()
    for t in sides:
        t.join(180)
    appender.close()
    renamer.close()
    present = [count(control, after, m) for m in mids]
    control.close()
    if len(set(present)) != 1:  # MULTIAPPEND: some of its messages, not all
        return answers[0], -1, answers[1]
    return answers[0], present[0], answers[1]


def verdict(answer: bytes, present: int) -> str:
    ok = answer.split(b" ", 2)[1:2] == [b"OK"]
    if present < 0:
        return "PARTIAL"
    if present > 1:
        return "twice"
    return ("OK+present" if present else "OK+ABSENT") if ok else ("NO+PRESENT" if present else "NO+absent")


def run(addr: tuple[str, int], user: str, rounds: int, op: str, start: int = 0, top: str = "A",
        appended_as: str | None = None, messages: int = 1, seed: int = 0,
        other_addr: tuple[str, int] | None = None) -> tuple[collections.Counter, list]:
    """*rounds* races; the census of verdicts and every bad round (its answers)."""
    rng = random.Random(seed)
    tally: collections.Counter = collections.Counter()
    bad = []
    for i in range(start, start + rounds):
        size = rng.choice([1024, 8192, 65536, 262144, 1048576])
        plus = rng.random() < 0.5
        delay = rng.random() * (0.002 + size / 200e6)
        answer, present, other = one_round(addr, user, i, op, size, plus, delay, top, appended_as, messages,
                                           other_addr=other_addr)
        v = verdict(answer, present)
        tally[v] += 1
        if v not in ("OK+present", "NO+absent"):
            bad.append((i, v, size, plus, answer, other))
    return tally, bad


def main(rounds: int, ops: tuple[str, ...]) -> int:
    from referral_proxy.fleet import Dovecot, make_root

    d = Dovecot("b1", "127.0.0.9", make_root("rp-append-race-") / "b1")
    d.start()
    try:
        for k, op in enumerate(ops):
            tally, bad = run((d.host, d.port), "alice", rounds, op, start=k * rounds, seed=k)
            print(f"{op}: {rounds} rounds: {dict(tally)}")
            for b in bad[:5]:
                print("   ", b)
        return 0
    finally:
        d.stop()


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60, tuple(sys.argv[2:]) or OPS))
