"""A RENAME on one backend while a COPY across servers into (or out of) one of its mailboxes is at Dovecot.

A COPY across is a MULTIAPPEND of the source's bytes on a connection of the proxy's own. Soak C seed
85057 (two proxies on PostgreSQL): a COPY across into Proj was saving when another session's ``RENAME
Proj Work`` ran on the same backend; Dovecot answered the COPY "NO Mailbox was deleted under us", its
dovecot-uidlist dotlock went along to .Work, and the next writer there ("Broken file dovecot-uidlist:
UIDs not ordered (91 >= 91)") gave one UID to two messages: a cross-server MOVE into Work then failed
its verification by content, and its recovery kept both the source and the copy (the message twice).

The COPY's journal entry held only its lock names, which no RENAME takes: the RENAME never waited. Now
it also holds its two mailboxes, shared (as a MOVE across does): a RENAME of either, or of a parent,
waits for it (holds.py, a few seconds at most) or is refused NO [INUSE]; the COPY lands whole.

Here the destination's uidlist lock is held by the test, so the COPY's MULTIAPPEND is at Dovecot,
stalled at its commit, when the RENAME comes. Judged by the answers' order and a census by content.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, seed
from test_admin_move_meets_relayed_move import HeldBoxLock
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")


def _ready(w: Wire) -> list[bytes]:
    """The lines *w* has received by now (a short look: nothing waited for)."""
    w.sock.settimeout(0.3)
    try:
        lines = w.lines_until(TimeoutError, BlockingIOError)
    finally:
        w.sock.settimeout(120)
    w.buf = b"".join(lines) + w.buf  # (given back: until_tagged reads them again)
    return lines


@pytest.mark.parametrize("renamed", ["Proj", "the source"])
def test_a_rename_waits_for_a_copy_across_that_is_saving(proxy_factory, fleet, renamed):
    seed(fleet["b3"], "carol", "Shared/S", ["src@t"])
    seed(fleet["b1"], "carol", "Proj", ["p@t"])
    lock = HeldBoxLock(fleet["b1"], "carol", ".Proj")
    proxy = proxy_factory(MASTERS, rules=RULES)
    rename = b"RENAME Proj Work" if renamed == "Proj" else b'RENAME "Shared/S" "Shared/T"'
    try:
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        assert w.cmd(b"s", b'SELECT "Shared/S"')[-1].startswith(b"s OK")
        w.send(b"c UID COPY 1 Proj\r\n")
        assert lock.stalled_move_linked(), "the COPY across did not reach Dovecot"
        r = Wire(proxy.host, proxy.port, timeout=120)
        r.login("carol")
        r.send(b"r " + rename + b"\r\n")
        renamed_answer = r.until_tagged(b"r")  # within holds.WAIT (3 s) while the COPY is held at Dovecot
        copy_at_rename = _ready(w)
    finally:
        (lock.root.parent / ".Work" / "dovecot-uidlist.lock").unlink(missing_ok=True)  # (if it went along)
        if lock.root.exists():
            assert lock.release()
        else:  # renamed away under the COPY (before the mend): nothing left to wait for
            lock.holder.kill()
            lock.holder.wait()
    answer = w.until_tagged(b"c")
    assert not any(line.startswith(b"c ") for line in copy_at_rename), "the COPY was answered before"
    assert renamed_answer[-1].startswith(b"r NO [INUSE]"), (renamed_answer, answer)  # not while the COPY saves
    assert answer[-1].startswith(b"c OK [COPYUID"), answer
    time.sleep(0.5)
    counts, where = census(fleet, "carol")
    assert sorted(where["src@t"]) == [("b1", "Proj"), ("b3", "Shared/S")], (where, answer, renamed_answer)
    assert where["p@t"] == [("b1", "Proj")], where
