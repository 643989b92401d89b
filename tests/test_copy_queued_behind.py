"""A COPY relayed within one backend, queued behind its session's commands, is checked when it goes.

copywait.py left this race: a session's COPY read while another command of its session was still
in flight (here a COPY stalled at Dovecot on a lock) was checked at once (nothing held) and relayed;
Dovecot ran it only after the command ahead. A MOVE across of the same message begun in between
(another session), cut off after it had copied the message and flagged it \\Deleted, then left that
message to the COPY: an OLDMOVE (COPY, STORE \\Deleted, EXPUNGE) of it made a second instance, recovery
found nothing left to expunge, and two moves of one message made two. Now a relayed COPY waits for
the commands ahead of it, then is checked and sent at once (copycommand.CopyCommands._relay_after_moves; a relayed
MOVE is checked once it has its turn). Real Dovecot; a census by content.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import LEFT_TO_RECOVER, QUICK_REFUSAL, merged, seed
from test_moves import MASTERS, RULES, _no_entries
from test_moves_other_instance import finish_oldmove_then_recover, journal_cut_off_at_expunging

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("verb", ["OLDMOVE", "MOVE"])
def test_a_relayed_copy_behind_another_command_is_checked_when_it_goes_not_when_read(proxy_factory, fleet, verb):
    """The session pipelines `UID COPY 1 INBOX`, stalled at Dovecot on INBOX's dovecot-uidlist lock
    (held by the test: test_rename_move_stalled.HeldLock), and `UID COPY 3 Other` (Other and INBOX on
    b1 with Work: both relayed). The cut-off MOVE of UID 3 (work-2) is journaled while the first COPY
    is stalled; then the lock goes and, if the second COPY was OK, the client flags and expunges UID 3
    (an OLDMOVE). Before: the second COPY, relayed at once, copied the flagged message (OK); after
    `recover` work-2 was in Shared/Dest and Other: twice. Now it waits for the COPY ahead of it, then
    for the MOVE across (NO [INUSE] after [map] move_wait_seconds): once, not in Work. The same with `UID MOVE 3 Other`
    instead of the OLDMOVE (before: checked when read, relayed once its turn came)."""
    from test_moves import ids
    from test_rename_move_stalled import HeldLock

    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    seed(fleet["b1"], "carol", "INBOX", [])
    seed(fleet["b1"], "carol", "Other", [])
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    proxy = proxy_factory(merged(MASTERS, LEFT_TO_RECOVER, QUICK_REFUSAL), rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    lock = HeldLock(fleet["b1"], "carol")
    try:
        w.send(b"a UID COPY 1 INBOX\r\nc UID %s 3 Other\r\n" % (b"MOVE" if verb == "MOVE" else b"COPY"))
        assert lock.stalled_move_linked()  # (the first COPY waits for INBOX's lock at Dovecot)
        journal_cut_off_at_expunging(proxy, fleet, "3")
        time.sleep(1.0)  # (the proxy's snapshot of the journal has polled it)
    finally:
        assert lock.release()
    assert w.until_tagged(b"a")[-1].startswith(b"a OK")
    answer = w.until_tagged(b"c")[-1]
    counts, where, _ = finish_oldmove_then_recover(proxy, fleet, w, answer if verb == "OLDMOVE" else b"")
    assert counts["work-2@t"] == 1 and ("b1", "Work") not in where["work-2@t"], (answer, where["work-2@t"])
    assert sorted(where["work-0@t"]) == [("b1", "INBOX"), ("b1", "Work")], where["work-0@t"]
    assert all(counts[m] == 1 for m in ("work-1@t", "work-3@t", "work-4@t")), counts
    assert _no_entries(proxy)
