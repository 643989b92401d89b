"""MOVE to another server out of a mailbox the user may not expunge from (RFC 4314 rights, Dovecot's
ACL plugin, on in every test Dovecot), against real Dovecot.

Dovecot's own MOVE there says ``NO [NOPERM] Permission denied`` and copies nothing. Its STORE of
\\Deleted without the ``t`` right, and its UID EXPUNGE without ``e``, answer OK and change nothing:
the proxy copied the messages, found them "expunged" and answered OK (without ``t``: "No
messages moved", the copies taken back), or, with ``t`` but no ``e``, OK "Move completed" with
every message now on both servers."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli, journal_empty, judge, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


@pytest.mark.parametrize("rights", ["lr", "lrs", "lrstw", "lrswie"])
def test_a_move_across_without_the_right_to_expunge_is_refused_and_copies_nothing(proxy_factory, fleet, rights):
    work = ["work-0@t", "work-1@t", "work-2@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    with fleet["b1"].client("carol") as m:  # carol's own rights on her mailbox (she keeps 'a')
        assert m._simple_command("SETACL", "Work", "carol", rights)[0] == "OK"
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    selected = w.cmd(b"s", b"SELECT Work")[-1]
    assert selected.startswith(b"s OK [READ-ONLY]" if rights == "lr" else b"s OK [READ-WRITE]"), selected
    for tag, move in ((b"m", b"UID MOVE 1:* Shared/Dest"), (b"n", b"MOVE 2 Shared/Dest")):
        answer = w.cmd(tag, move)[-1]
        assert answer.startswith(tag + b" NO [NOPERM] "), answer
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work} == {("b1", "Work")}
    with fleet["b1"].client("carol") as m:  # no \Deleted left behind
        m.select("Work", readonly=True)
        assert b"Deleted" not in b" ".join(m.uid("FETCH", "1:*", "(FLAGS)")[1])
    assert w.cmd(b"c", b"UID COPY 1 Shared/Dest")[-1].startswith(b"c OK")  # reading is allowed: COPY copies
    assert census(fleet, "carol")[0]["work-0@t"] == 2


@pytest.mark.parametrize("rights", ["lrswi", "lrswite", "lrswitek"])
def test_a_rename_across_without_the_rights_to_empty_and_delete_the_source_is_refused(proxy_factory, fleet, rights):
    """Dovecot's RENAME needs the right x on the mailbox (and says NO [NOPERM]); a move across also
    needs t and e to empty the source. Without them the proxy copied everything, committed, and
    then could not expunge (no t, e: every message twice, the source hidden on b1) or rename the
    source aside (no x: an empty Work left on b1), its entry retried by every sweep, the names held
    (NO [INUSE]) for good. Now: NO [NOPERM] before anything changes, for the admin move too."""
    work, child = ["work-0@t", "work-1@t"], ["kid-0@t"]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/c", child)
    with fleet["b1"].client("carol") as m:
        assert m._simple_command("SETACL", "Work/c", "carol", rights)[0] == "OK"
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    answer = w.cmd(b"r", b"RENAME Work Shared/W")[-1]
    assert answer.startswith(b"r NO [NOPERM] "), answer
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    assert moved.returncode != 0 and "NOPERM" in moved.stdout + moved.stderr, moved.stdout + moved.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work + child) == ([], [])
    assert {where[i][0] for i in work} == {("b1", "Work")} and where[child[0]] == [("b1", "Work/c")]
    with fleet["b3"].client("carol") as m:  # nothing made there
        assert [x for x in m.list()[1] if x and b"Shared" in x] == []
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")  # nothing held
    assert journal_empty(proxy)



@pytest.mark.parametrize("cmd", [b"UID MOVE 3 Shared/Dest", b"UID COPY 3 Shared/Dest"])
def test_a_refused_copy_across_still_shows_the_expunges_the_source_announced(proxy_factory, fleet, cmd):
    """Another session expunged message 1; the COPY/MOVE's UID SEARCH on the source got Dovecot's
    ``* 1 EXPUNGE``, then the destination refused the APPEND (no right i). The refusal was raised and
    the EXPUNGE never reached the client: its message numbers were one off from the backend's for
    the rest of the session (a STORE 2 +FLAGS (\\Deleted), EXPUNGE would remove another message)."""
    seed(fleet["b1"], "carol", "Work", ["work-0@t", "work-1@t", "work-2@t"])
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    with fleet["b3"].client("carol") as m:
        assert m._simple_command("SETACL", '"Shared/Dest"', "carol", "lr")[0] == "OK"
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        m.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
        assert m.uid("EXPUNGE", "1")[0] == "OK"
    answer = w.cmd(b"m", cmd)
    assert answer[-1].startswith(b"m NO [NOPERM] "), answer
    assert b"* 1 EXPUNGE\r\n" in answer, answer
    w.cmd(b"d", b"STORE 1 +FLAGS.SILENT (\\Deleted)")  # the client's message 1 is now work-1
    assert w.cmd(b"e", b"EXPUNGE")[-1].startswith(b"e OK")
    counts, where = census(fleet, "carol")
    assert dict(counts) == {"work-2@t": 1}, where
