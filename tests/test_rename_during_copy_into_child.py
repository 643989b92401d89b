"""A RENAME of a parent on one backend while a relayed COPY/MOVE into its child is still at Dovecot.

Dovecot's COPY/MOVE on maildir links the message into the destination's tmp/, then waits for the
destination's dovecot-uidlist lock to commit it; a RENAME of the parent meanwhile moves the child's
directory, the lock inside it, away. Direct, Dovecot then answers "NO Mailbox was deleted under us"
with the message kept under the new name now and then (design.md), or loses track of it (soak C
seed 68001: files in the renamed child's cur/ the uidlist does not name). Here the lock is held by
the test, so the COPY/MOVE is at Dovecot, stalled, when the RENAME comes.

Judged by the files on disk and the census: every message file counted, and the message where the
answer says (COPY OK: in the source and the renamed child; MOVE OK: in the renamed child only).
Seen with Dovecot 2.3.19: the RENAME runs, the stalled COPY/MOVE answers "NO Mailbox was deleted
under us" within 0.2 s with nothing saved (its linked file removed), the message in INBOX only: the
client's retry is right. A guard: the proxy does not order a copy INTO a mailbox with its parent's
RENAME (only MOVEs out of it: turns.py), and this is why that is enough here.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import _message_files, census, seed
from test_admin_move_meets_relayed_move import HeldBoxLock
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("verb", [b"COPY", b"MOVE"])
def test_a_rename_of_the_parent_waits_for_a_copy_into_its_child(proxy_factory, fleet, verb):
    seed(fleet["b1"], "carol", "INBOX", ["src@t"])
    seed(fleet["b1"], "carol", "P", ["p@t"])
    seed(fleet["b1"], "carol", "P/C", ["c@t"])
    lock = HeldBoxLock(fleet["b1"], "carol", ".P.C")
    try:
        proxy = proxy_factory(MASTERS, rules=RULES)
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        w.send(b"c UID " + verb + b" 1 P/C\r\n")
        assert lock.stalled_move_linked(), "the copy did not reach Dovecot"
        r = Wire(proxy.host, proxy.port, timeout=120)
        r.login("carol")
        r.send(b"r RENAME P Q\r\n")
        time.sleep(3)
    finally:  # (the lock file went along if the RENAME ran)
        (lock.root.parent / ".Q.C" / "dovecot-uidlist.lock").unlink(missing_ok=True)
        lock.path.unlink(missing_ok=True)
        lock.holder.kill()
        lock.holder.wait()
    answer = w.until_tagged(b"c")
    renamed = r.until_tagged(b"r")
    time.sleep(1)
    counts, where = census(fleet, "carol")
    files = _message_files(fleet["b1"], "carol")
    assert files == sum(counts.values()), (files, where, answer, renamed)  # nothing on disk Dovecot lost
    ok = answer[-1].startswith(b"c OK")
    assert renamed[-1].startswith(b"r OK"), renamed
    expected = ([] if verb == b"MOVE" and ok else [("b1", "INBOX")]) + ([("b1", "Q/C")] if ok else [])
    assert sorted(where["src@t"]) == sorted(expected), (where, answer, renamed)
    assert where["c@t"] == [("b1", "Q/C")] and where["p@t"] == [("b1", "Q")], where
