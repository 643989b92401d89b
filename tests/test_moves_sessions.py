"""A MOVE to another server while other sessions change its mailboxes, against real Dovecot.

Flags: each message's flags as they are when it leaves the source, as Dovecot's own MOVE does:
flags a second session sets or clears while the move runs (a STORE, the \\Seen of a non-PEEK
FETCH), keywords, and \\Deleted (a message already \\Deleted moves too, keeping the flag).
Then a source message expunged while the MOVE reads it, and a destination deleted and made anew
while it runs (killed, recovered). Judged by a census of the backends and the flags read there."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import (
    census,
    cli,
    faulty,
    journal_empty,
    journal_killed_move,
    judge,
    multiappend,
    quote,
    seed,
    wait_paused,
)

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def _flags(backend, mailbox: str) -> dict[str, set[str]]:
    """Message-Id -> its flags (without \\Recent), in *mailbox* on *backend*."""
    with backend.client("carol") as m:
        m.select(quote(mailbox), readonly=True)
        flags, ids = {}, {}
        for item in m.uid("FETCH", "1:*", "(UID FLAGS)")[1]:
            uid, rest = item.decode().split("UID ", 1)[1].split(" ", 1)
            flags[uid] = {f for f in rest.split("FLAGS (", 1)[1].split(")", 1)[0].split() if f != "\\Recent"}
        for item in m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")[1]:
            if isinstance(item, tuple):
                ids[item[0].decode().split("UID ", 1)[1].split(" ", 1)[0]] = item[1].decode().split(":", 1)[1].strip().strip("<>")
    return {ids[u]: f for u, f in flags.items()}


def test_a_deleted_message_moves_across_with_its_flag(proxy_factory, fleet):
    """Dovecot's STORE +FLAGS (\\Deleted) names no message that had the flag already: the MOVE took
    such a message for one another client had expunged, took its copy back and left it in the source
    ("No messages moved"), where Dovecot's own MOVE moves it, \\Deleted and all."""
    work = ["work-0@t", "work-1@t", "work-2@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        m.uid("STORE", "1", "+FLAGS", "(\\Deleted $Later)")
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    answer = w.cmd(b"m", b"UID MOVE 1:* Shared/Dest")
    assert answer[-1].startswith(b"m OK"), answer
    assert any(b"[COPYUID " in line and b" 1:3 " in line for line in answer), answer
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work} == {("b3", "Shared/Dest")}
    assert _flags(fleet["b3"], "Shared/Dest")["work-0@t"] == {"\\Seen", "\\Deleted", "$Later"}


def test_flags_changed_by_another_session_while_a_move_runs_are_carried(proxy_factory, fleet, tmp_path):
    """The MOVE read the flags, then (stopped at move-appending, its MULTIAPPEND not yet sent)
    another session flags one message, clears a flag of another and reads a third without PEEK
    (\\Seen): the copies must carry the flags the messages had when they left the source."""
    work = ["work-0@t", "work-1@t", "work-2@t", "work-3@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        m.uid("STORE", "2", "+FLAGS", "(\\Answered $Work)")
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--pause-at", "move-appending:1",
                                                               "--pause-dir", str(pause)))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:* Shared/Dest\r\n")
    wait_paused(pause, "move-appending:1")
    with fleet["b1"].client("carol") as m:  # a second session, while the proxy is stopped
        m.select("Work")
        m.uid("STORE", "1", "+FLAGS", "(\\Flagged $Urgent)")
        m.uid("STORE", "2", "-FLAGS", "($Work)")
        m.uid("FETCH", "3", "(BODY[])")  # sets \Seen
    (pause / "resume").touch()
    answer = w.until_tagged(b"m")
    assert answer[-1].startswith(b"m OK"), answer
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work} == {("b3", "Shared/Dest")}
    flags = _flags(fleet["b3"], "Shared/Dest")
    # seeded: \Seen, (none), \Flagged $Work, \Seen (movecheck.seed); then the second session's changes
    assert flags == {"work-0@t": {"\\Seen", "\\Flagged", "$Urgent"}, "work-1@t": {"\\Answered"},
                     "work-2@t": {"\\Flagged", "$Work", "\\Seen"}, "work-3@t": {"\\Seen"}}, flags


def test_a_destination_made_anew_during_a_killed_move_is_not_taken_for_another(proxy_factory, fleet, tmp_path):
    """Stopped at move-appending (the destination's UIDVALIDITY recorded), another session DELETEs
    and CREATEs the destination again; the MULTIAPPEND goes into the new mailbox, is verified there,
    and the proxy is killed at move-appended. Recovery compared the copies' mailbox with the
    UIDVALIDITY recorded before, found "another mailbox", and kept the sources: every message twice."""
    work = ["work-0@t", "work-1@t", "work-2@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--pause-at", "move-appending:1", "--pause-dir",
                                                               str(pause), "--kill-at", "move-appended:1"))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:2 Shared/Dest\r\n")
    wait_paused(pause, "move-appending:1")
    with fleet["b3"].client("carol") as m:
        assert m.delete(quote("Shared/Dest"))[0] == "OK"
        assert m.create(quote("Shared/Dest"))[0] == "OK"
    (pause / "resume").touch()
    assert w.closed(30), "the proxy was not killed at move-appended"
    proxy.process.wait(10)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work[:2]} == {("b3", "Shared/Dest")} and where[work[2]] == [("b1", "Work")]


@pytest.mark.parametrize("step", ["reserved:1", "move-appending:1"])
def test_a_source_message_expunged_while_a_move_reads_it_refuses_the_move_as_dovecot_does(proxy_factory, fleet, tmp_path,
                                                                                     step):
    """Another session expunges one of the messages after the MOVE arrived, before its body is
    read: the MULTIAPPEND is aborted (nothing saved) and the MOVE answered "NO unexpected message 2".
    The rest were then moved once more, taken for Dovecot's way; Dovecot's own MOVE says NO
    [EXPUNGEISSUED] and moves nothing (tests/differential corpus 40-attack11), and so does this."""
    work = ["work-0@t", "work-1@t", "work-2@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--pause-at", step, "--pause-dir", str(pause)))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:2 Shared/Dest\r\n")
    wait_paused(pause, step)
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        m.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
        assert m.uid("EXPUNGE", "1")[0] == "OK"
    (pause / "resume").touch()
    answer = w.until_tagged(b"m")
    assert answer[-1].startswith(b"m NO [EXPUNGEISSUED] "), answer
    assert not any(b"[COPYUID " in line for line in answer), answer
    assert w.cmd(b"n", b"UID SEARCH ALL")[0].startswith(b"* SEARCH 2 3"), "the client's view is the backend's"
    counts, where = census(fleet, "carol")
    assert dict(counts) == {"work-1@t": 1, "work-2@t": 1}, where
    assert where["work-1@t"] == [("b1", "Work")] and where["work-2@t"] == [("b1", "Work")]
    assert journal_empty(proxy)


@pytest.mark.parametrize("committed", [True, False])
def test_a_move_in_flight_into_a_destination_made_anew_is_found_and_finished(proxy_factory, fleet, committed):
    """Killed after its MULTIAPPEND's last byte, before move-appended (made here by hand: no journal
    step lies between), while another session had deleted and made the destination again after the
    MOVE's STATUS: recovery looked for the copies under the UIDVALIDITY recorded before, found
    "another mailbox", took the MULTIAPPEND for one that never committed and kept the sources: every
    message twice. Now a new destination holding the whole MULTIAPPEND, in order on consecutive
    UIDs, is taken for the one the copies went to."""
    import hashlib

    work = ["work-0@t", "work-1@t", "work-2@t", "work-3@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ["old-0@t"])
    proxy = proxy_factory(MASTERS, rules=RULES)
    with fleet["b3"].client("carol") as m:
        typ, answer = m.status(quote("Shared/Dest"), "(UIDVALIDITY UIDNEXT)")
        words = answer[0].decode().replace("(", " ").replace(")", " ").split()
        validity, uidnext = int(words[words.index("UIDVALIDITY") + 1]), int(words[words.index("UIDNEXT") + 1])
        assert m.delete(quote("Shared/Dest"))[0] == "OK"  # with old-0: the other session's doing
    seed(fleet["b3"], "carol", "Shared/Dest", ["new-0@t"])  # made anew; a delivery there first
    with fleet["b1"].client("carol") as m:
        m.select("Work", readonly=True)
        bodies = [item[1] for item in m.uid("FETCH", "2:3", "(BODY.PEEK[])")[1] if isinstance(item, tuple)]
        src_validity = int(m.response("UIDVALIDITY")[1][0])
    if committed:
        with fleet["b3"].client("carol") as m:
            multiappend(m, [b"s APPEND " + quote("Shared/Dest").encode()] + [b" () {%d+}\r\n" % len(b) + b for b in bodies])
    data = {"src": "b1", "src_mailbox": "Work", "src_validity": src_validity, "src_uids": "2:3", "dst": "b3",
            "dst_mailbox": "Shared/Dest", "dst_validity": validity, "dst_uidnext": uidnext,
            "hashes": [hashlib.sha256(b).hexdigest() for b in bodies]}
    journal_killed_move(proxy, data)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert ("2 message(s) removed" if committed else "never committed") in recovered.stdout, recovered.stdout
    counts, where = census(fleet, "carol")
    assert judge(counts, work + ["new-0@t"]) == ([], []), where
    assert {where[i][0] for i in work[1:3]} == {("b3", "Shared/Dest") if committed else ("b1", "Work")}
    assert journal_empty(proxy)
