"""A client's command already on its way to the backend when a move's reservation lands (issue 9).

The proxy refuses STORE/EXPUNGE/MOVE in a mailbox a move holds (NO [INUSE]), but a command
relayed an instant before the reservation runs on at the backend while the move copies. Seen
in the soak (--admin, seed 764): a client's same-backend UID MOVE INBOX -> Work, answered 0.8 s
after it was sent, overlapped `move carol '*' b3`: the move had copied the message from INBOX
and again from Work, and it was on b3 twice. Here the overlap is made exact: the move is paused
after its first batch and the command sent straight to the backend (as the in-flight one ran).
Judged by a census of the backends.
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, seed, start_paused, wait_paused
from test_moves import MASTERS, RULES, _exactly_once, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def _uid_of(m, mid: str) -> bytes:
    typ, data = m.uid("SEARCH", "HEADER", "Message-Id", mid)
    assert typ == "OK" and len(data[0].split()) == 1, data
    return data[0]


def _paused_move(proxy, tmp_path, *args: str):
    pause = tmp_path / "pause"
    proc = start_paused(pause, "copied:1", "move", "--config", str(proxy.config_path), *args)
    wait_paused(pause, "copied:1")  # the first source's messages are on the destination, verified
    return proc, pause


def _resume(proc, pause) -> bytes:
    (pause / "resume").touch()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("what", ["*", "INBOX"])
def test_a_message_moved_within_the_source_while_it_was_copied_is_moved_once(proxy_factory, fleet, tmp_path, what):
    inbox, work = ids("inbox", 8), ids("work", 4)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    proc, pause = _paused_move(proxy, tmp_path, "carol", what, "b2")
    try:
        with fleet["b1"].client("carol") as m:  # the command that was already on its way
            m.select("INBOX")
            typ, data = m.uid("MOVE", _uid_of(m, inbox[3]), "Work")
            assert typ == "OK", data
    finally:
        _resume(proc, pause)
    _exactly_once(fleet, proxy, "carol", inbox + work)
    counts, where = census(fleet, "carol")
    assert where[inbox[3]] == [("b2" if what == "*" else "b1", "Work")], where[inbox[3]]


def test_a_message_expunged_in_the_source_while_it_was_copied_does_not_come_back(proxy_factory, fleet, tmp_path):
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    proc, pause = _paused_move(proxy, tmp_path, "carol", "Work", "b3")
    try:
        with fleet["b1"].client("carol") as m:
            m.select("Work")
            uid = _uid_of(m, work[0])
            assert m.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
            assert m.uid("EXPUNGE", uid)[0] == "OK"
    finally:
        _resume(proc, pause)
    _exactly_once(fleet, proxy, "carol", work[1:])
    counts, where = census(fleet, "carol")
    assert counts[work[0]] == 0, where[work[0]]
    assert {where[i][0] for i in work[1:]} == {("b3", "Work")}


def test_a_moves_copy_moved_on_before_it_was_verified_leaves_no_duplicate(proxy_factory, fleet, tmp_path):
    """Seen in the soak (--admin, seed 806): a client's MOVE Work/c -> Shared/B/c (b1 -> b3) had its
    copy committed on b3, where another client saw it and moved it to INBOX before the MOVE read it
    back ("NO message UID 93 could not be read from b3"); the entry, not yet knowing the copies'
    UIDs, was recovered as "the destination never committed": the source kept, the message twice.
    Here the proxy is paused between the commit and the verification (the journal write of the
    copies' UIDs) and the copy moved on straight at b3."""
    work = ids("work", 3)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    seed(fleet["b3"], "carol", "Shared/Next", [])
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES,
                          command=faulty("--pause-at", "move-appending:3", "--pause-dir", str(pause)))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1 Shared/Dest\r\n")
    assert wait_paused(pause, "move-appending:3") == "move-appending:3"
    with fleet["b3"].client("carol") as m:  # another client sees the copy and moves it on
        assert m.select("Shared/Dest")[1] == [b"1"]
        assert m.uid("MOVE", "1:*", "Shared/Next")[0] == "OK"
    (pause / "resume").touch()
    w.until_tagged(b"m")  # NO (its verification found the copy gone), or OK: the census judges
    w.close()
    proxy.stop()
    assert cli("recover", "--config", str(proxy.config_path)).returncode == 0
    proxy.start()
    _exactly_once(fleet, proxy, "carol", work)
    assert census(fleet, "carol")[1][work[0]] == [("b3", "Shared/Next")]
