"""Recovery of a cut-off MOVE across beside another instance of the same message that the user's own
COPY or MOVE across made through the proxy (helper copylock19's cases, kept on recovery19's rule: a
MOVE whose outcome is unknown and none of whose copies is where it saved them keeps its source).
Real Dovecot; judged by a census of every backend by content."""

from __future__ import annotations

import os
import time

import pytest
from imapwire import Wire, wait_for
from movecheck import (
    LEFT_TO_RECOVER,
    QUICK_REFUSAL,
    census,
    cli,
    deliver,
    faulty,
    journal_killed_move,
    journal_store,
    merged,
    quote,
    seed,
    wait_paused,
)
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
    proxy = proxy_factory(merged(MASTERS, QUICK_REFUSAL), rules=RULES)
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
    answer = w.cmd(b"b", b"UID " + verb + b" 1 Work")[-1]
    # a COPY across waits for the cut-off MOVE of its destination (copywait.py): NO [INUSE] after
    # move_wait_seconds (or OK, the proxy's own sweep having recovered the MOVE meanwhile); a MOVE does not wait
    assert answer.startswith(b"b OK") or (verb == b"COPY" and answer.startswith(b"b NO [INUSE]")), answer
    done = answer.startswith(b"b OK")
    w.close()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    made = (3 if verb == b"COPY" else 2) if done else 2  # a MOVE back: Archive/X's goes, Work's comes
    assert counts["work-2@t"] == made, (answer, where["work-2@t"], recovered.stdout)
    assert where["work-2@t"].count(("b1", "Work")) == (2 if done else 1), where["work-2@t"]
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


def test_the_users_copy_into_a_cut_off_moves_destination_is_not_taken_for_the_moves_copy(proxy_factory, fleet):
    """Soak A, seed 53212: a MOVE of work-2 Work -> Shared/Dest cut off before its MULTIAPPEND committed
    (the proxy killed; hashes journaled, outcome unknown); the user then COPYs work-2 to Shared/Dest
    through the proxy: an APPEND of the same bytes, above the journaled UIDNEXT. Recovery's find_copies
    took it for the MOVE's copy (in the soak: found at its second look, SETTLE seconds after the first,
    the COPY having landed in between), verified it and expunged the source: work-2 once where the
    user made two (the COPY was answered OK). The census must match what the client was told: a COPY
    answered OK leaves work-2 twice, one of them in Work; a COPY refused (INUSE, the mend: a COPY
    across waits, up to move_wait_seconds, for a MOVE across holding its source or destination:
    copywait.py) leaves it once, in Work."""
    from test_moves import _journaled_killed_move

    proxy, _data, _work = _journaled_killed_move(proxy_factory, fleet, 5, "3", config=merged(MASTERS, QUICK_REFUSAL))
    w = _session(proxy)
    answer = w.cmd(b"c", b"UID COPY 3 Shared/Dest")[-1]
    w.close()
    _recovered_as_answered(proxy, fleet, answer, 1)


def _recovered_as_answered(proxy, fleet, answer: bytes, refused: int) -> None:
    """`recover`, then the census: work-2 *refused* times if the user's COPY (*answer*) was refused,
    once more if it was OK; one of them in Work (the cut-off MOVE never committed); no entry left."""
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    made = refused + 1 if answer.startswith(b"c OK") else refused
    assert counts["work-2@t"] == made and ("b1", "Work") in where["work-2@t"], (answer, where["work-2@t"],
                                                                               recovered.stdout)
    assert _no_entries(proxy)


def _unanswered(w: Wire, tag: bytes, seconds: float) -> bool:
    """No tagged answer to *tag* has come within *seconds* (lines read meanwhile are kept)."""
    w.sock.settimeout(seconds)
    try:
        while True:
            line = w.line()
            if line.startswith(tag + b" "):
                w.buf = line + w.buf  # until_tagged finds it again
                return False
    except TimeoutError:
        return True
    finally:
        w.sock.settimeout(120)


def test_the_users_copy_into_a_live_moves_destination_waits_and_survives_its_kill(proxy_factory, fleet, tmp_path):
    """The soak's case with the MOVE's proxy alive: UID MOVE 3 Work -> Shared/Dest through p1, stopped
    with its hashes journaled and its MULTIAPPEND's last byte unsent (move-appending:2); through p2
    (same store) the user's UID COPY 3 Shared/Dest. On main the COPY was answered at once, its copy
    above the journaled UIDNEXT; p1 killed, p2's recovery took it for the MOVE's copy and expunged
    work-2 from Work. The COPY now waits for the MOVE's entry (its answer once p2's recovery has
    released it, or NO [INUSE] after move_wait_seconds and then sent again, as a client would): work-2
    twice, in Work and Shared/Dest. The wait stays the default 10 s: it must outlast the kill and p2's
    recovery for the COPY to be let through."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    pause = tmp_path / "pause"
    pause.mkdir()
    shared = dict(MASTERS) if os.environ.get("RP_TEST_STORE") == "postgresql" else \
        {**MASTERS, "map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    p1 = proxy_factory(shared, rules=RULES, command=faulty("--pause-at", "move-appending:2", "--pause-dir", str(pause)))
    p2 = proxy_factory(shared, rules=RULES)
    mover, copier = _session(p1), _session(p2)
    mover.send(b"m UID MOVE 3 Shared/Dest\r\n")
    assert wait_paused(pause, "move-appending:2") == "move-appending:2"
    copier.send(b"c UID COPY 3 Shared/Dest\r\n")
    waited = _unanswered(copier, b"c", 1.5)
    p1.process.kill()
    p1.process.wait(30)
    answer = copier.until_tagged(b"c")[-1]
    if answer.startswith(b"c NO [INUSE]"):
        wait_for(lambda: _no_entries(p2), "the move recovered", timeout=120)
        answer = copier.cmd(b"c", b"UID COPY 3 Shared/Dest")[-1]
    wait_for(lambda: _no_entries(p2), "the move recovered", timeout=120)
    copier.close()
    counts, where = census(fleet, "carol")
    assert answer.startswith(b"c OK"), answer
    assert counts["work-2@t"] == 2 and sorted(where["work-2@t"]) == [("b1", "Work"), ("b3", "Shared/Dest")], \
        where["work-2@t"]
    assert waited, "the COPY across did not wait for the MOVE holding its destination"



def test_a_copy_across_waits_as_long_as_move_wait_seconds_says(proxy_factory, fleet, tmp_path):
    """[map] move_wait_seconds is obeyed: a MOVE Work -> Shared/Dest cut off (outcome unknown, left to
    recovery) holds the COPY's destination. Through a proxy with move_wait_seconds = 1 the user's UID
    COPY 3 Shared/Dest is refused NO [INUSE] (nothing copied); through one with 120 (same store) it is
    still unanswered 2 s later, and answered OK once the entry is ended (its holder released). The
    census: work-2 twice, in Work and Shared/Dest."""
    from storehelp import now

    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    shared = merged(MASTERS, LEFT_TO_RECOVER)
    if os.environ.get("RP_TEST_STORE") != "postgresql":
        shared = merged(shared, {"map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}})
    quick = proxy_factory(merged(shared, {"map": {"move_wait_seconds": 1}}), rules=RULES)
    slow = proxy_factory(merged(shared, {"map": {"move_wait_seconds": 120}}), rules=RULES)
    journal_killed_move(quick, _killed_move_data(fleet, "3"))
    refused = _session(quick)
    assert refused.cmd(b"c", b"UID COPY 3 Shared/Dest")[-1].startswith(b"c NO [INUSE]")
    refused.close()
    waiting = _session(slow)
    waiting.send(b"c UID COPY 3 Shared/Dest\r\n")
    assert _unanswered(waiting, b"c", 2.0), "the COPY did not wait move_wait_seconds = 120"
    store = journal_store(slow)
    try:
        for entry in now(store.journal()):
            now(store.end_move(entry.id))  # the holder released, as recovery of a never-committed MOVE does
    finally:
        now(store.close())
    answer = waiting.until_tagged(b"c")[-1]
    waiting.close()
    assert answer.startswith(b"c OK"), answer
    counts, where = census(fleet, "carol")
    assert counts["work-2@t"] == 2 and sorted(where["work-2@t"]) == [("b1", "Work"), ("b3", "Shared/Dest")], \
        where["work-2@t"]
    assert _no_entries(slow)

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


@pytest.mark.parametrize("other", ["staging", "map"])
def test_only_a_moves_entry_holds_a_copy_across_back(other):
    """copywait.moves_holding: a move-messages entry holding a COPY's source or destination (shared,
    as a MOVE holds both) is in its way, whoever owns it; another op's shared hold of the same name
    (an APPEND staged, `map set`) is not; a MOVE's entry gone, nothing is."""
    from storehelp import now

    from referral_proxy.config import MapConfig
    from referral_proxy.copywait import held_by_any, moves_holding, wait_for_moves
    from referral_proxy.journal import Reservation
    from referral_proxy.routing import MailboxMap

    m = MailboxMap(MapConfig(default="b1"))
    held = [Reservation("Work", False, True), Reservation("Shared/Dest", False, True)]
    assert not held_by_any(m, "carol", ["Work", "Shared/Dest"])
    now(m.begin_move("carol", other, held, {}))
    assert held_by_any(m, "carol", ["Other", "Work"]) and not held_by_any(m, "carol", ["Other", "Archive/X"])
    assert now(moves_holding(m, "carol", ["Work", "Archive/X"])) == set()
    move = now(m.begin_move("carol", "move-messages", held, {}))
    for names in (["Work", "Archive/X"], ["Archive/X", "Shared/Dest"], ["Shared/Dest", "Work"]):
        assert now(moves_holding(m, "carol", names)) == {move.id}, names
    assert now(moves_holding(m, "carol", ["Archive/X", "Other"])) == set()
    assert now(moves_holding(m, "dave", ["Work"])) == set()
    assert not now(wait_for_moves(m, "carol", ["Shared/Dest"], None, 10.0))
    now(m.end_move(move))
    assert now(wait_for_moves(m, "carol", ["Work", "Shared/Dest"], None, 10.0))


def _cut_off_at_expunging(proxy_factory, fleet, source: str = "Work"):
    """*source* (5, b1; Work unless said), Shared/Dest (2, b3), Archive/X (b2) and Other (b1) empty, a proxy whose own recovery
    check is slowed (the entry is left to the test's `recover`), and a MOVE of UID 3 (work-2) cut off at
    move-expunging (journal_cut_off_at_expunging). The proxy."""
    seed(fleet["b1"], "carol", source, ids("work", 5))
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    seed(fleet["b2"], "carol", "Archive/X", [])
    seed(fleet["b1"], "carol", "Other", [])
    proxy = proxy_factory(merged(MASTERS, LEFT_TO_RECOVER, QUICK_REFUSAL), rules=RULES)
    journal_cut_off_at_expunging(proxy, fleet, "3", source)
    return proxy


def journal_cut_off_at_expunging(proxy, fleet, uid: str, source: str = "Work") -> None:
    """A MOVE of *source*'s *uid* (b1) to Shared/Dest (b3) journaled as a proxy killed at move-expunging
    leaves it: its copy committed (APPENDUID recorded), the source flagged \\Deleted and not yet expunged,
    still visible; its entry holding both mailboxes and the source's move_lock, as transfer._hold takes them."""
    from storehelp import now
    from test_moves import _copy_directly, _state

    from referral_proxy.journal import Reservation, Step
    from referral_proxy.transfer import move_lock

    data = _killed_move_data(fleet, uid, source)
    _copy_directly(fleet, "b1", source, "b3", "Shared/Dest", uid)
    with fleet["b1"].client("carol") as m:
        m.select(quote(source))
        m.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
    assert _state(fleet["b3"], "Shared/Dest")[1] == data["dst_uidnext"] + 1
    data.update(dst_uids=str(data["dst_uidnext"]), present=uid, vanished_dst="")
    store = journal_store(proxy)
    try:
        held = [Reservation(source, False, True), Reservation("Shared/Dest", False, True),
                Reservation(move_lock(source, "/"), False)]
        entry = now(store.begin_move("carol", "move-messages", held, data, None, "/"))
        for step in (Step.MOVE_APPENDING, Step.MOVE_APPENDED, Step.MOVE_EXPUNGING):
            now(store.journal_step(entry, step, data, None))
    finally:
        now(store.close())


def finish_oldmove_then_recover(proxy, fleet, w, answer: bytes, tag: bytes = b"c"):
    """An OLDMOVE's rest if its COPY (*tag*) was OK: UID STORE 3 +FLAGS (\\Deleted), UID EXPUNGE 3; then
    the session closed, `recover` run: (census counts, where, recover's output)."""
    if answer.startswith(tag + b" OK"):
        assert w.cmd(b"d", b"UID STORE 3 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"d OK")
        assert w.cmd(b"e", b"UID EXPUNGE 3")[-1].startswith(b"e OK")
    w.close()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    return counts, where, recovered.stdout


@pytest.mark.parametrize(("verb", "to", "source", "selected"), [
    ("OLDMOVE", "Archive/X", "Work", b"Work"), ("MOVE", "Archive/X", "Work", b"Work"),
    ("OLDMOVE", "Other", "Work", b"Work"), ("MOVE", "Other", "Work", b"Work"),
    ("OLDMOVE", "Other", "INBOX", b"iNbOx"), ("MOVE", "Other", "INBOX", b"iNbOx"),
    ("OLDMOVE", "Other", "INBOX/Sub", b"inbox/Sub"), ("MOVE", "Other", "INBOX/Sub", b"inbox/Sub")])
def test_another_sessions_move_of_a_cut_off_moves_source_message_makes_no_second(proxy_factory, fleet, verb, to,
                                                                                 source, selected):
    """Soak A, seed 53171: a MOVE work-2 Work -> Shared/Dest cut off at move-expunging (its copy
    committed, the source flagged \\Deleted, still there); before its recovery another session moves
    the source message through the proxy: OLDMOVE (UID COPY, then UID STORE +FLAGS (\\Deleted) and
    UID EXPUNGE if the COPY was OK) or UID MOVE, to Archive/X (b2: carried out by the proxy) or to
    Other (b1, the source's backend: relayed to Dovecot). In the soak the COPY across found the
    message and copied it, the session expunged it, and recovery "finished: 0 message(s) removed from
    the source": work-2 twice, where two moves of one message make one. The census: once, not in the source.
    Also with the source INBOX (or under it) SELECTed in another case (RFC 3501 5.1): the MOVE holds
    its MOVE_LOCK under the name normalized ("INBOX/Sub"); the relayed check asked for "inbox/Sub"
    and found nothing held (4 of 4 failed so)."""
    proxy = _cut_off_at_expunging(proxy_factory, fleet, source)
    w = _session(proxy, selected)
    if verb == "MOVE":
        answer = w.cmd(b"m", b"UID MOVE 3 " + to.encode())[-1]
    else:
        answer = w.cmd(b"c", b"UID COPY 3 " + to.encode())[-1]
    counts, where, recovered = finish_oldmove_then_recover(proxy, fleet, w, answer)
    assert counts["work-2@t"] == 1 and ("b1", source) not in where["work-2@t"], (answer, where["work-2@t"],
                                                                              recovered)
    assert _no_entries(proxy)


def test_the_users_relayed_copy_into_a_cut_off_moves_destination_is_not_taken_for_the_moves_copy(proxy_factory,
                                                                                                 fleet):
    """Soak A seed 53212's loss with the user's COPY relayed: a MOVE work-2 Work -> Shared/Dest (b3)
    cut off before its MULTIAPPEND committed (outcome unknown); work-2 also in Shared/Other (b3, with
    its INTERNALDATE, as a COPY across saves it); the user COPYs that one to Shared/Dest through the
    proxy: within b3, relayed to Dovecot (same bytes, above the journaled UIDNEXT). Recovery took it
    for the MOVE's copy and expunged Work's: twice where the user made three. The census matches the
    answer: OK, three (one in Work); NO [INUSE] (the COPY waits for the MOVE across: copywait.py), two."""
    from test_moves import _copy_directly

    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    seed(fleet["b3"], "carol", "Shared/Other", [])
    _copy_directly(fleet, "b1", "Work", "b3", "Shared/Other", "3")
    proxy = proxy_factory(merged(MASTERS, LEFT_TO_RECOVER, QUICK_REFUSAL), rules=RULES)
    journal_killed_move(proxy, _killed_move_data(fleet, "3"))
    w = _session(proxy, b"Shared/Other")
    answer = w.cmd(b"c", b"UID COPY 1 Shared/Dest")[-1]
    w.close()
    _recovered_as_answered(proxy, fleet, answer, 2)
