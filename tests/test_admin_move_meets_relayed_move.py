"""An admin move of a mailbox while a client's relayed MOVE out of it is still running at Dovecot
(soak C, seed 70552, no kills: c3-26 in b3's INBOX and in Proj).

A client's ``UID MOVE`` within b1, INBOX -> Proj, was relayed before the admin move of INBOX to b3
reserved it, and held at Dovecot on Proj's dovecot-uidlist lock (another process's commit there:
2.7 s in the soak; here a lock the test holds). Dovecot's MOVE has hard-linked the message into
Proj's tmp/ and only expunges it from INBOX once it commits. Meanwhile the move copied INBOX to
b3 and drained it: its own ``UID MOVE`` to the drop took the message as well (two MOVEs of one
message at Dovecot both succeed: turns.py). The client's MOVE then committed: the message in Proj
and in b3's INBOX. The move now takes the relayed MOVEs' turn of each source mailbox (crossturns.py)
for its drain and for its RENAME aside, as a RENAME on one backend does: it waits for the MOVE already
at Dovecot, then finds the message gone and takes its copy back from b3 (drain.py). Once.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from imapwire import Wire, wait_for
from movecheck import admin_move, census, journal_empty, seed
from test_moves import MASTERS, RULES, _no_entries
from test_rename_move_stalled import HeldLock

pytestmark = pytest.mark.usefixtures("clean_mail")


def begun(proxy) -> None:
    """The admin move has its journal entry (its names reserved): its command started seconds later
    than it was run on a loaded machine (CI, three test processes at once: not within the 4 s once waited)."""
    wait_for(lambda: not journal_empty(proxy), "the admin move's journal entry", 90)


class HeldBoxLock(HeldLock):
    """The dovecot-uidlist.lock of one mailbox (maildir ``.NAME``), not INBOX's."""

    def __init__(self, backend, user: str, folder: str) -> None:
        super().__init__(backend, user)
        self.path.unlink()
        self.root = Path(backend.user_mail_dir(user)) / folder
        self.path = self.root / "dovecot-uidlist.lock"
        self.path.write_text(f"{self.holder.pid}:{socket.gethostname()}")


@pytest.mark.parametrize("source", ["INBOX", "Work"])
def test_an_admin_move_waits_for_a_relayed_move_out_of_its_source_still_at_dovecot(proxy_factory, fleet, source):
    """INBOX (drained in place) and Work (drained, then renamed aside): the message moved once."""
    seed(fleet["b1"], "carol", source, ["moved@t", "kept@t"])
    seed(fleet["b1"], "carol", "Proj", ["proj@t"])
    lock = HeldBoxLock(fleet["b1"], "carol", ".Proj")
    mover = None
    try:
        proxy = proxy_factory(MASTERS, rules=RULES)
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        assert w.cmd(b"s", b"SELECT " + source.encode())[-1].startswith(b"s OK")
        w.send(b"m UID MOVE 1 Proj\r\n")
        assert lock.stalled_move_linked(), "the MOVE did not reach Dovecot"
        mover = admin_move(proxy, "carol", source, "b3")
        begun(proxy)
        time.sleep(2)  # the move copies and drains meanwhile (it took 0.6 s in the soak)
    finally:
        assert lock.release()
    out, err = mover.communicate(timeout=120)
    assert mover.returncode == 0, out + err
    answer = w.until_tagged(b"m")
    counts, where = census(fleet, "carol")
    assert counts["moved@t"] == 1, (where, answer)
    assert where["kept@t"] == [("b3", source)] and where["proj@t"] == [("b1", "Proj")], where
    assert _no_entries(proxy)


def test_a_relayed_move_waiting_for_its_turn_when_an_admin_move_begins_is_refused(proxy_factory, fleet):
    """A second session's MOVE out of INBOX waits in the proxy for the turn of the first (held at
    Dovecot); the admin move of INBOX begins meanwhile. Once its turn comes it is checked again:
    NO [INUSE], as it is when sent during a move; its message moved once, by the admin move."""
    seed(fleet["b1"], "carol", "INBOX", ["first@t", "second@t", "kept@t"])
    seed(fleet["b1"], "carol", "Proj", ["proj@t"])
    lock = HeldBoxLock(fleet["b1"], "carol", ".Proj")
    mover = None
    try:
        proxy = proxy_factory(MASTERS, rules=RULES)
        first, second = (Wire(proxy.host, proxy.port, timeout=120) for _ in range(2))
        for w in (first, second):
            w.login("carol")
            assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        first.send(b"m UID MOVE 1 Proj\r\n")
        assert lock.stalled_move_linked(), "the MOVE did not reach Dovecot"
        second.send(b"m UID MOVE 2 Proj\r\n")  # waits for the first's turn, in the proxy
        time.sleep(0.5)
        mover = admin_move(proxy, "carol", "INBOX", "b3")
        begun(proxy)
        time.sleep(2)
    finally:
        assert lock.release()
    out, err = mover.communicate(timeout=120)
    assert mover.returncode == 0, out + err
    assert first.until_tagged(b"m")[-1].startswith(b"m OK")
    answer = second.until_tagged(b"m")
    counts, where = census(fleet, "carol")
    assert counts["first@t"] == counts["second@t"] == 1, (where, answer)
    assert where["second@t"] == [("b3", "INBOX")] and answer[-1].startswith(b"m NO [INUSE]"), (where, answer)
    assert where["kept@t"] == [("b3", "INBOX")] and where["proj@t"] == [("b1", "Proj")], where
    assert _no_entries(proxy)
