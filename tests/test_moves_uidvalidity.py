"""A mailbox moved to another server never keeps its UIDVALIDITY while its messages get new UIDs
(RFC 3501 2.3.1.1: UIDs are not reassigned under one UIDVALIDITY), against real Dovecot.

Dovecot gives a new mailbox the current second as its UIDVALIDITY: INBOX made on two backends in
the same second (a new user's first merged LIST-STATUS opens INBOX on every backend) shares one.
`move carol '*' b2` then appended u1 u3 u4 u5 (UIDs 1 3 4 5) into b2's INBOX as UIDs 1 2 3 4 under
the same UIDVALIDITY, and a client deleting u3 by its cached UID 3 deleted u4 (probe 2 of stop 47).
validity.py: an INBOX onto one of the same UIDVALIDITY is refused before anything moves; a created
destination that got the source's is made again.
"""

from __future__ import annotations

import re
import time

import pytest
from imapwire import Wire
from movecheck import Deliverer, census, cli, faulty, judge, seed, set_validity, start_paused, validity_of, wait_paused
from test_several_proxies import ids

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def test_an_inbox_moved_onto_an_inbox_of_the_same_uidvalidity_is_refused(proxy_factory, fleet):
    mail = ids("u", 5)
    seed(fleet["b1"], "carol", "INBOX", mail)
    with fleet["b1"].client("carol") as m:  # a gap: u1 is UID 2 ... as after a delete long ago
        m.select("INBOX")
        m.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
        m.expunge()
    mine = validity_of(fleet["b1"], "carol", "INBOX")
    validity_of(fleet["b2"], "carol", "INBOX")  # there, made by a look
    set_validity(fleet["b2"], "carol", "INBOX", mine)
    proxy = proxy_factory(MASTERS)
    for what in ("INBOX", "*"):
        moved = cli("move", "--config", str(proxy.config_path), "carol", what, "b2")
        assert moved.returncode != 0 and "UIDVALIDITY" in moved.stdout + moved.stderr, moved.stdout + moved.stderr
        counts, where = census(fleet, "carol")
        assert judge(counts, mail[1:]) == ([], []) and {where[i][0] for i in mail[1:]} == {("b1", "INBOX")}
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert b"UIDVALIDITY %d]" % mine in b"".join(w.cmd(b"s", b"SELECT INBOX"))  # still b1's INBOX
    w.close()
    set_validity(fleet["b2"], "carol", "INBOX", mine + 7)  # what the operator is told to do
    moved = cli("move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, mail[1:]) == ([], []) and {where[i][0] for i in mail[1:]} == {("b2", "INBOX")}
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert b"UIDVALIDITY %d]" % (mine + 7) in b"".join(w.cmd(b"s", b"SELECT INBOX"))
    w.close()


def test_a_mailbox_created_for_a_rename_across_in_its_sources_second_is_made_again(proxy_factory, fleet, tmp_path):
    """Work on b1 is given a UIDVALIDITY two seconds ahead; the RENAME, paused before its CREATE on
    b3, goes on in that very second: Dovecot gives Shared/W the same one (every run here, without
    validity.py). Now Shared/W is made again and has one of its own."""
    mail = ids("w", 4)
    seed(fleet["b1"], "carol", "Work", mail)
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Shared/*", "backend": "b3"}],
                          command=faulty("--pause-at", "creating:1", "--pause-dir", str(pause)))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    w.send(b"r RENAME Work Shared/W\r\n")
    assert wait_paused(pause, "creating:1") == "creating:1"
    target = int(time.time()) + 2
    set_validity(fleet["b1"], "carol", "Work", target)
    while time.time() < target:  # not a measurement: the CREATE is to land in the second `target`
        time.sleep(0.005)
    (pause / "resume").touch()
    assert w.until_tagged(b"r")[-1].startswith(b"r OK"), "rename"
    w.close()
    assert validity_of(fleet["b3"], "carol", "Shared/W") != target
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], []) and {where[i][0] for i in mail} == {("b3", "Shared/W")}


def test_an_inbox_whose_messages_keep_their_uids_moves_onto_one_of_the_same_uidvalidity(proxy_factory, fleet):
    """UIDs 1 to 5 into a never used INBOX (UIDNEXT 1): each message keeps its UID, nothing a client
    cached is wrong; refusing would stop the move of every user made on two backends at once. Its
    HIGHESTMODSEQ is raised to the source's (probe 6 of stop 49: 46 there, 3 here after the move), and every
    copy's MODSEQ above it: a flag changed after a client cached HIGHESTMODSEQ is reported to its CHANGEDSINCE
    (probe r3, stop 50: the copies kept their APPEND's MODSEQs, below; only the copy the raise used came)."""
    mail = ids("k", 5)
    seed(fleet["b1"], "carol", "INBOX", mail)
    with fleet["b1"].client("carol") as m:  # 40 flag changes: HIGHESTMODSEQ past what 5 copies give
        m.select("INBOX")
        for i in range(20):
            m.store(str(i % 5 + 1), "+FLAGS", r"(\Answered)")
            m.store(str(i % 5 + 1), "-FLAGS", r"(\Answered)")
    mine = validity_of(fleet["b1"], "carol", "INBOX")
    validity_of(fleet["b2"], "carol", "INBOX")
    set_validity(fleet["b2"], "carol", "INBOX", mine)
    before, cached = _uids(fleet["b1"]), _highest_modseq(fleet["b1"])
    with fleet["b1"].client("carol") as m:  # after the client cached it: another session's change
        m.select("INBOX")
        m.uid("STORE", "3", "+FLAGS", r"(\Seen $Changed)")
    proxy = proxy_factory(MASTERS)
    moved = cli("move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert _uids(fleet["b2"]) == before and validity_of(fleet["b2"], "carol", "INBOX") == mine
    # RFC 7162: not lower under the UIDVALIDITY kept, or a client's CHANGEDSINCE its cached one misses changes
    assert _highest_modseq(fleet["b2"]) >= cached, (cached, _highest_modseq(fleet["b2"]))
    with fleet["b2"].client("carol") as m:
        m.select("INBOX", readonly=True)
        typ, data = m.uid("FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d)" % cached)
    changed = {int(re.search(rb"UID (\d+)", d).group(1)): d for d in data if isinstance(d, bytes)}
    assert 3 in changed and b"$Changed" in changed[3], data


def _highest_modseq(backend) -> int:
    with backend.client("carol") as m:
        typ, data = m.status("INBOX", "(HIGHESTMODSEQ)")
    return int(re.search(rb"HIGHESTMODSEQ (\d+)", data[0]).group(1))


def _uids(backend) -> dict[bytes, int]:
    """Message-Id -> UID in carol's INBOX."""
    with backend.client("carol") as m:
        m.select("INBOX", readonly=True)
        typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    return {re.search(rb"<([^>]+)>", part[1]).group(1): int(re.search(rb"UID (\d+)", part[0]).group(1))
            for part in data if isinstance(part, tuple)}


def test_each_move_raises_the_uidvalidity_so_a_mailbox_never_comes_back_to_one_it_had(proxy_factory, fleet):
    """Dovecot numbers new mailboxes from a counter per backend, which a user's CREATEs drive ahead of the
    clock: Box moved b3 -> b1 -> b2 came back to b3's UIDVALIDITY, its messages renumbered under it (probe 3
    of stop 49). Here b3's is 40 s ahead: the destination Dovecot gives (the clock's) is below it, and taken
    on the old code; now it is made again until above, each hop."""
    mail = ids("h", 4)
    seed(fleet["b3"], "carol", "Box", ["gone@t", *mail])
    with fleet["b3"].client("carol") as m:  # a gap: the messages' UIDs 2..5 would become 1..4 anywhere else
        m.select("Box")
        m.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
        m.expunge()
    ahead = int(time.time()) + 40
    set_validity(fleet["b3"], "carol", "Box", ahead)
    proxy = proxy_factory(MASTERS)
    placed = cli("map", "--config", str(proxy.config_path), "set", "carol", "Box", "b3")
    assert placed.returncode == 0, placed.stderr
    seen = [ahead]
    for to in ("b1", "b2"):
        done = cli("move", "--config", str(proxy.config_path), "carol", "Box", to)
        assert done.returncode == 0, done.stdout + done.stderr
        seen.append(validity_of(fleet[to], "carol", "Box"))
        assert seen[-1] > seen[-2], f"Box's UIDVALIDITY went {seen}: not raised by the move to {to}"
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], []) and {where[i][0] for i in mail} == {("b2", "Box")}


def test_a_delivery_to_the_destination_inbox_during_a_move_onto_its_uidvalidity_rolls_the_move_back(
        proxy_factory, fleet, tmp_path):
    """INBOX onto one of its UIDVALIDITY, moved because each copy keeps its UID: a message delivered there
    after the first batch took UID 501, and the next 20 copies were renumbered under the UIDVALIDITY kept;
    a client deleting by its cached UIDs deleted the wrong ones (probe 6 of stop 49). Now each batch's
    copies are checked to have their sources' UIDs: the move is refused and rolled back."""
    mail = ids("d", 520)  # two batches (copystream.BATCH_MESSAGES = 500)
    seed(fleet["b1"], "carol", "INBOX", mail)
    mine = validity_of(fleet["b1"], "carol", "INBOX")
    validity_of(fleet["b2"], "carol", "INBOX")
    set_validity(fleet["b2"], "carol", "INBOX", mine)
    proxy = proxy_factory(MASTERS)
    pause = tmp_path / "pause"
    mover = start_paused(pause, "copied:1", "move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert wait_paused(pause, "copied:1") == "copied:1"
    seed(fleet["b2"], "carol", "INBOX", ["late@t"])  # the MTA delivers to the new home already
    (pause / "resume").touch()
    said = b"".join(part or b"" for part in mover.communicate(timeout=300)).decode()
    assert mover.returncode != 0 and "UIDs" in said, said
    counts, where = census(fleet, "carol")
    assert judge(counts, [*mail, "late@t"]) == ([], [])
    assert {where[i][0] for i in mail} == {("b1", "INBOX")} and where["late@t"][0] == ("b2", "INBOX")


def test_a_source_uidvalidity_minutes_ahead_of_the_clock_is_crossed(proxy_factory, fleet):
    """A user's folder churn (CREATE, DELETE) puts a backend's UIDVALIDITY counter ahead of the clock: 350 of them,
    ~347 s ahead, and `move` was refused, [CANNOT] ... not above, at every try until the clock caught up
    (probe t1 of stop 51: the recreations were capped at 300). Here 400 s ahead: moved, its UIDVALIDITY above."""
    mail = ids("ahead", 3)
    seed(fleet["b1"], "carol", "Box", mail)
    ahead = int(time.time()) + 400
    set_validity(fleet["b1"], "carol", "Box", ahead)
    proxy = proxy_factory(MASTERS)
    done = cli("move", "--config", str(proxy.config_path), "carol", "Box", "b2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert validity_of(fleet["b2"], "carol", "Box") > ahead
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], []) and {where[i][0] for i in mail} == {("b2", "Box")}


def test_mail_delivered_to_a_destination_being_made_again_is_never_deleted(proxy_factory, fleet):
    """A RENAME across whose new mailbox must be made again (its UIDVALIDITY not above the source's) while a
    delivery agent writes straight to that name on the destination: the old code DELETEd and CREATEd the
    name itself, and Dovecot's DELETE took a message delivered between its STATUS and the DELETE (soak seed
    9210, probe g1 of stop 57: 1-2 rounds of 10 lost mail). Now it is made again under a private name only."""
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    lost, answers = [], []
    for r in range(6):
        src, dst = f"Shared/Src{r}", f"Dst{r}"
        with fleet["b3"].client("carol") as m:  # b3's counter well ahead of b1's: many remakes
            for _ in range(40):
                m.create("churn")
                m.delete("churn")
        seed(fleet["b3"], "carol", src, [f"s{r}-{i}@v" for i in range(3)])
        agents = [Deliverer(fleet["b1"], "carol", dst, f"r{r}a{k}") for k in range(3)]
        for a in agents:
            a.start()
        time.sleep(0.3)
        w = Wire(proxy.host, proxy.port, timeout=300)
        w.login("carol")
        began = time.monotonic()
        answers.append(w.cmd(b"r", b'RENAME "%s" "%s"' % (src.encode(), dst.encode()))[-1])
        print(f"round {r}: {time.monotonic() - began:.1f}s {answers[-1]!r}")
        w.close()
        for a in agents:
            a.stop()
        counts, where = census(fleet, "carol")
        lost += [(i, r) for a in agents for i in a.acked if counts[i] != 1]
        lost += [(f"s{r}-{i}@v", where.get(f"s{r}-{i}@v")) for i in range(3) if counts[f"s{r}-{i}@v"] != 1]
    assert not lost, (lost[:10], answers)
    assert all(a.startswith(b"r OK") for a in answers), answers


@pytest.mark.parametrize("away", [b"DELETE Work", b"RENAME Work Q/W", b"RENAME Work S/W"],
                         ids=["deleted", "renamed-across", "renamed-on-b3"])
def test_a_name_made_again_where_it_routes_now_never_gets_back_its_old_uidvalidity(proxy_factory, fleet, away):
    """Work placed on b3 (a move, or `map set`), then DELETEd or RENAMEd away: its placement goes and the name
    routes to b1 again. CREATE Work there got b1's next UIDVALIDITY, which was the one Work had on b3 (b1's
    counter driven ahead by a sync client's folders): a client resyncing with its cached UIDVALIDITY took
    the new Work's messages for the old ones, QRESYNC saying nothing changed (probe m6 of stop 61, 3 of 3).
    Now b1's counter is put past it when the name leaves b3."""
    with fleet["b1"].client("carol") as m:  # 40 folders in a second: b1 numbers the next from the last
        for i in range(40):
            m.create(f"F{i}")
    taken = validity_of(fleet["b1"], "carol", "F39") + 1  # b1's next
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Q/*", "backend": "b2"}, {"mailbox": "S/*", "backend": "b3"}])
    placed = cli("map", "--config", str(proxy.config_path), "set", "carol", "Work", "b3")
    assert placed.returncode == 0, placed.stderr
    seed(fleet["b3"], "carol", "Work", ["old-1@t"])
    set_validity(fleet["b3"], "carol", "Work", taken)
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"a", away)[-1].startswith(b"a OK")
    assert w.cmd(b"c", b"CREATE Work")[-1].startswith(b"c OK")
    status = b"".join(w.cmd(b"s", b"STATUS Work (UIDVALIDITY)"))
    w.close()
    now = validity_of(fleet["b1"], "carol", "Work")  # made where the name routes now
    assert b"UIDVALIDITY %d)" % now in status and now > taken, (now, taken, status)
    kept = [] if away.startswith(b"DELETE") else ["old-1@t"]
    counts, where = census(fleet, "carol")
    assert judge(counts, kept) == ([], []) and all(where[i] != [("b1", "Work")] for i in kept), where
