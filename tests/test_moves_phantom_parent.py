"""A parent DELETEd while it had children: Dovecot lists it still (no \\Noselect, to every session) and says
it does not exist to STATUS and SELECT. Direct Dovecot renames the tree holding it; through the proxy a
RENAME across, and the admin move of the user or of the tree, failed ``STATUS failed on b3: Mailbox doesn't
exist`` (probe v2, stop 52): one such name blocked moving the user. Only its children move now."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli, seed
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")


def _phantom(fleet, backend: str, top: str) -> None:
    """*top*/Q deleted with its child *top*/Q/y (one message) kept; *top* holds one message of its own."""
    seed(fleet[backend], "carol", top, [f"{top}-top@t"])
    seed(fleet[backend], "carol", f"{top}/Q/y", [f"{top}-qy@t"])
    with fleet[backend].client("carol") as m:
        assert m.create(f"{top}/Q")[0] in ("OK", "NO")  # (made already as y's parent: ALREADYEXISTS)
        assert m.delete(f"{top}/Q")[0] == "OK"
        assert m.status(f"{top}/Q", "(MESSAGES)")[0] == "NO"  # listed, yet not there


@pytest.mark.parametrize("old", ["Shared/G", "Shared/G/Q"])
def test_a_rename_across_of_a_tree_holding_a_deleted_parent_moves_its_children(proxy_factory, fleet, old):
    proxy = proxy_factory({**MASTERS}, rules=RULES)
    _phantom(fleet, "b3", "Shared/G")
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    new = "Local" if old == "Shared/G" else "LocalQ"
    assert w.cmd(b"r", b"RENAME %s %s" % (old.encode(), new.encode()))[-1].startswith(b"r OK"), old
    counts, where = census(fleet, "carol")
    assert all(n == 1 for n in counts.values()) and len(counts) == 2, where
    assert where["Shared/G-qy@t"] == [("b1", f"{new}/y" if old == "Shared/G/Q" else "Local/Q/y")]
    assert where["Shared/G-top@t"] == [("b1", "Local")] if old == "Shared/G" else [("b3", "Shared/G")]


@pytest.mark.parametrize("what", ["Proj", "*"])
def test_the_admin_move_of_a_user_with_a_deleted_parent_moves_the_rest(proxy_factory, fleet, what):
    proxy = proxy_factory({**MASTERS}, rules=RULES)
    _phantom(fleet, "b1", "Proj")
    done = cli("move", "--config", str(proxy.config_path), "carol", what, "b2")
    assert done.returncode == 0, done.stdout + done.stderr
    counts, where = census(fleet, "carol")
    assert all(n == 1 for n in counts.values()) and len(counts) == 2, where
    assert where["Proj-qy@t"] == [("b2", "Proj/Q/y")] and where["Proj-top@t"] == [("b2", "Proj")]


def test_a_rename_across_onto_a_deleted_parent_is_made_there(proxy_factory, fleet):
    """Probe w5 (stop 52): RENAME Work Shared/P, where Shared/P on b3 was DELETEd with a child: Dovecot's RENAME
    on one server does it; the proxy answered NO [ALREADYEXISTS] (mailops.exists took the listed name)."""
    proxy = proxy_factory({**MASTERS}, rules=RULES)
    seed(fleet["b1"], "carol", "Work", ["work@t"])
    seed(fleet["b3"], "carol", "Shared/P", [])
    seed(fleet["b3"], "carol", "Shared/P/c", ["c@t"])
    with fleet["b3"].client("carol") as m:
        assert m.delete("Shared/P")[0] == "OK"
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"r", b"RENAME Work Shared/P")[-1].startswith(b"r OK")
    counts, where = census(fleet, "carol")
    assert where == {"work@t": [("b3", "Shared/P")], "c@t": [("b3", "Shared/P/c")]}, where


def test_a_killed_move_whose_destination_became_a_deleted_parent_is_recovered(proxy_factory, fleet):
    """Probe w5 (stop 52): a MOVE across killed once its copies were recorded; then its destination, which has a
    child, was DELETEd at Dovecot: listed still, no mailbox. Recovery took it for there, its EXAMINE failed at
    every sweep, and the source stayed NO [INUSE] for good. It counts as gone now: the source is left."""
    from movecheck import faulty

    seed(fleet["b1"], "carol", "Src", ["m0@t", "m1@t"])
    seed(fleet["b3"], "carol", "Shared/D", [])
    seed(fleet["b3"], "carol", "Shared/D/c", [])
    proxy = proxy_factory({**MASTERS}, rules=RULES, command=faulty("--kill-at", "move-appended:1"))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Src")[-1].startswith(b"s OK")
    w.send(b"m MOVE 1:* Shared/D\r\n")
    assert w.closed(60), "the proxy was not killed at move-appended"
    proxy.process.wait(10)
    with fleet["b3"].client("carol") as m:
        assert m.delete("Shared/D")[0] == "OK"  # (and the copies with it)
    done = cli("recover", "--config", str(proxy.config_path))
    assert done.returncode == 0 and "destination mailbox gone" in done.stdout, done.stdout + done.stderr
    counts, where = census(fleet, "carol")
    assert where == {"m0@t": [("b1", "Src")], "m1@t": [("b1", "Src")]}, where
