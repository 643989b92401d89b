"""An APPEND to a mailbox that another session has just RENAMEd away (the RENAME answered first):
Dovecot 2.3.19.1 answers NO [TRYCREATE], except on a connection that has that mailbox SELECTED,
which answers NO [SERVERBUG] ("open(.X/tmp/...) failed: No such file or directory" in its log),
nothing saved either way. The soak's APPEND NO [SERVERBUG] answers (3 in 51 runs of soak C, each
0-30 ms after another session's RENAME of the name appended to) are this, relayed as it is. The same
when another mailbox has been renamed to the name meanwhile (``selected-it-replaced``: "Transaction
log .../.X/dovecot.index.log: duplicate transaction log sequence (2)" in its log here; "Corrupted
transaction log file ... indexid changed" when the mailbox renamed in has a longer history, soak G 97101).

Not collected (a fact about the backend): ``python3 tests/dovecot_append_selected_renamed.py``;
Dovecot on $HOST (default 127.0.0.27; 127.0.0.20-30 only). Prints one line per case, e.g.
``selected-it: NO [SERVERBUG] ...``, ``fresh: NO [TRYCREATE] ...``, and whether a message is in the
new name afterwards (never, so far).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from imapwire import Wire  # noqa: E402

from referral_proxy.fleet import Dovecot, make_root  # noqa: E402

MESSAGE = b"From: a@example.org\r\nSubject: selected-renamed\r\n\r\nbody\r\n"
# case: what session A did with X before B renames it
CASES = ("fresh", "appended-to-it", "status-of-it", "selected-it", "selected-inbox", "child-appended-to",
         "selected-it-replaced")


def main() -> int:
    root = make_root("rp-selren-")
    d = Dovecot("b1", os.environ.get("HOST", "127.0.0.27"), root / "b1")
    d.start()

    def session() -> Wire:
        w = Wire(d.host, d.port, timeout=10)
        w.login("alice", "secret")
        return w

    def append(w: Wire, box: bytes) -> bytes:
        w.send(b"a APPEND %s {%d+}\r\n%s\r\n" % (box, len(MESSAGE), MESSAGE))
        return w.until_tagged(b"a")[-1].strip()

    try:
        for case in CASES:
            b, a = session(), session()
            x, y = b"X-" + case.encode(), b"Y-" + case.encode()
            target = x + b"/c" if case == "child-appended-to" else x
            b.cmd(b"c", b"CREATE " + target)
            if case in ("appended-to-it", "child-appended-to"):
                append(a, target)
            elif case == "status-of-it":
                a.cmd(b"s", b"STATUS " + x + b" (MESSAGES)")
            elif case in ("selected-it", "selected-it-replaced"):
                a.cmd(b"s", b"SELECT " + x)
            elif case == "selected-inbox":
                a.cmd(b"s", b"SELECT INBOX")
            renamed = b.cmd(b"r", b"RENAME %s %s" % (x, y))[-1].strip()
            if case == "selected-it-replaced":  # another mailbox takes the name
                b.cmd(b"z", b"CREATE Z" + x)
                renamed += b" / " + b.cmd(b"r", b"RENAME Z%s %s" % (x, x))[-1].strip()
            answer = append(a, target)
            moved = y + target[len(x):]
            count = b.cmd(b"t", b"STATUS " + moved + b" (MESSAGES)")
            print(f"{case}: RENAME {renamed.decode()!r}; APPEND after it {answer.decode()!r}; "
                  f"{moved.decode()} now {[c.decode().strip() for c in count[:-1]]}", flush=True)
            a.close()
            b.close()
    finally:
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
