"""Recovery of a cut-off MOVE across beside another instance of the same message that the user's own
COPY or MOVE across made through the proxy (helper copylock19's cases, kept on recovery19's rule: a
MOVE whose outcome is unknown and none of whose copies is where it saved them keeps its source).
Real Dovecot; judged by a census of every backend by content."""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, cli, deliver, journal_killed_move, quote, seed
from test_moves import MASTERS, RULES, _killed_move_data, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")

#: Longer than a backend's SAVEDATE resolution and any clock slack between proxy and backend.
AGED = 3.0


def _session(proxy, select: bytes = b"Work") -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT " + select)[-1].startswith(b"s OK")
    return w


def _cut_off_after_copy(proxy_factory, fleet, *, aged: bool):
    """Work (b1), Shared/Dest (b3), Archive/X (b2); UID COPY 3 Work -> Archive/X through a proxy (*aged*:
    AGED seconds before the next step); then a MOVE of UID 3 to Shared/Dest journaled as cut off before
    its APPENDUID (never committed) and mail delivered to Shared/Dest expunged (room there: no proof it
    never committed). (the proxy, its session, still selecting Work)"""
    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    seed(fleet["b2"], "carol", "Archive/X", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _session(proxy)
    assert w.cmd(b"c", b"UID COPY 3 Archive/X")[-1].startswith(b"c OK")
    if aged:
        time.sleep(AGED)
    data = _killed_move_data(fleet, "3")
    journal_killed_move(proxy, data)
    deliver(fleet["b3"], "carol", "Shared/Dest", "passing@t")
    with fleet["b3"].client("carol") as m:
        m.select(quote("Shared/Dest"))
        m.uid("STORE", f"{data['dst_uidnext']}", "+FLAGS.SILENT", "(\\Deleted)")
        m.uid("EXPUNGE", f"{data['dst_uidnext']}")
    return proxy, w


@pytest.mark.parametrize("verb", [b"COPY", b"MOVE"])
def test_the_users_instance_brought_into_the_source_of_a_cut_off_move_takes_nothing(proxy_factory, fleet, verb):
    """work-2 COPYed across to Archive/X (b2); a MOVE of work-2 Work -> Shared/Dest cut off, outcome
    unknown (never committed); the user COPYs (or MOVEs) Archive/X's work-2 back into Work through the
    proxy (same content and INTERNALDATE, a new X-GUID, saved since the move began): recovery must not
    take it for the MOVE's copy moved back and expunge the older (copylock19: it did, with the guess)."""
    proxy, w = _cut_off_after_copy(proxy_factory, fleet, aged=True)
    assert w.cmd(b"x", b"SELECT Archive/X")[-1].startswith(b"x OK")
    assert w.cmd(b"b", b"UID " + verb + b" 1 Work")[-1].startswith(b"b OK")
    w.close()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    made = 3 if verb == b"COPY" else 2  # a MOVE back: Archive/X's goes, Work's comes
    assert counts["work-2@t"] == made, (where["work-2@t"], recovered.stdout)
    assert where["work-2@t"].count(("b1", "Work")) == 2, where["work-2@t"]
    assert _no_entries(proxy)


def test_a_copy_across_just_before_a_move_of_the_same_message_cut_off(proxy_factory, fleet):
    """UID COPY 3 Work -> Archive/X (b2) through the proxy, OK; at once a MOVE of UID 3 to Shared/Dest
    begins (journaled as cut off before its APPENDUID, never committed) and mail delivered to Shared/Dest
    is expunged; `recover`: work-2 must stay in Work (the MOVE never committed) beside the COPY's."""
    proxy, w = _cut_off_after_copy(proxy_factory, fleet, aged=False)
    w.close()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert counts["work-2@t"] == 2 and ("b1", "Work") in where["work-2@t"], (where["work-2@t"], recovered.stdout)
    assert ("b2", "Archive/X") in where["work-2@t"], where["work-2@t"]


@pytest.mark.xfail(strict=True, reason="loss21 (soak A, seed 53212): recovery's find_copies takes the user's COPY "
                                       "across into the cut-off MOVE's destination (same bytes, above the journaled "
                                       "UIDNEXT) for the MOVE's copy and expunges the source; a COPY across takes no "
                                       "reservation, so nothing keeps it out while the dead MOVE's entry is open")
def test_the_users_copy_into_a_cut_off_moves_destination_is_not_taken_for_the_moves_copy(proxy_factory, fleet):
    """Soak A, seed 53212: a MOVE of work-2 Work -> Shared/Dest cut off before its MULTIAPPEND committed
    (the proxy killed; hashes journaled, outcome unknown); the user then COPYs work-2 to Shared/Dest
    through the proxy: an APPEND of the same bytes, above the journaled UIDNEXT. Recovery's find_copies
    took it for the MOVE's copy (in the soak: found at its second look, SETTLE seconds after the first,
    the COPY having landed in between), verified it and expunged the source: work-2 once where the
    user made two (the COPY was answered OK). The census must match what the client was told: a COPY
    answered OK leaves work-2 twice, one of them in Work; a COPY refused (INUSE, the mend: a COPY
    across waits for the MOVE lock of its source) leaves it once, in Work."""
    from test_moves import _journaled_killed_move

    proxy, _data, _work = _journaled_killed_move(proxy_factory, fleet, 5, "3")
    w = _session(proxy)
    answer = w.cmd(b"c", b"UID COPY 3 Shared/Dest")[-1]
    w.close()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    made = 2 if answer.startswith(b"c OK") else 1
    assert counts["work-2@t"] == made and ("b1", "Work") in where["work-2@t"], (answer, where["work-2@t"],
                                                                               recovered.stdout)
    assert _no_entries(proxy)


def test_a_killed_moves_recovery_is_described_at_the_step_it_was_found_at(proxy_factory, fleet):
    """Recovery found a MOVE at move-appending, its copies committed, and finished it; its line said
    "at move-expunging" (describe() read the step recovery had stepped the entry to: soak A, seed
    53212's log). It names the step found."""
    from test_moves import _journaled_killed_move

    proxy, _data, _work = _journaled_killed_move(proxy_factory, fleet, 5, "3", copy=True)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "at move-appending: finished" in recovered.stdout, recovered.stdout
    counts, where = census(fleet, "carol")
    assert counts["work-2@t"] == 1 and where["work-2@t"] == [("b3", "Shared/Dest")], where["work-2@t"]
