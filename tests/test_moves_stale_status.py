"""A mailbox move asks STATUS only on a connection with nothing selected (Dovecot 2.3 answers a selected one from its view).

Dovecot answers ``STATUS`` of the mailbox selected on the same connection from that
session's view of it, not from the mailbox as it is: the UIDNEXT and MESSAGES of the
view's last sync (NOOP brings them up to date), and, for a mailbox renamed away or deleted
since and another made under its name, the OLD mailbox's UIDVALIDITY (NOOP does not change
that; UNSELECT, CLOSE, another SELECT or a fresh connection do). And an APPEND to that name
on that connection fails ``NO [SERVERBUG]``. A mailbox move's destination connection keeps
the mailbox its last batch was verified in selected (EXAMINE): the batches it carries past
the commit point, of mail that reached the source during the move, asked STATUS there.
"""

from __future__ import annotations

import pytest
from movecheck import deliver, seed, start_paused, wait_paused
from test_moves import MASTERS, RULES, _exactly_once, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_a_destination_made_anew_after_the_commit_point_takes_the_late_mail(proxy_factory, fleet, tmp_path):
    """Past the commit point a client renames the new Work away on b3 and makes another Work there;
    what reached the old Work on b1 meanwhile goes to the Work there is now, and the move ends.
    On main: STATUS answered the renamed one's UIDVALIDITY and UIDNEXT, the MULTIAPPEND failed
    (Dovecot's SERVERBUG) and the move was left to recovery."""
    work, late = ids("work", 20), ids("late", 3)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    pause = tmp_path / "pause"
    proc = start_paused(pause, "committed:1", "move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    wait_paused(pause, "committed:1")
    try:
        for mid in late:  # reached the source during the move: carried past the commit point
            assert deliver(fleet["b1"], "carol", "Work", mid) == "Work"
        with fleet["b3"].client("carol") as m:  # a client of the new place replaces the new Work
            assert m.rename("Work", '"Shared/Old"')[0] == "OK"
            assert m.create("Work")[0] == "OK"
    finally:
        (pause / "resume").touch()
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    _exactly_once(fleet, proxy, "carol", work + late)
    with fleet["b3"].client("carol") as m:
        assert m.select("Work", readonly=True) == ("OK", [b"3"])
        assert m.select('"Shared/Old"', readonly=True) == ("OK", [b"20"])
    assert _no_entries(proxy)
