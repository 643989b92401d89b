"""A mailbox moved to another server keeps its ACL and METADATA (RFC 4314, RFC 5464), as Dovecot's
own RENAME on one server does; against real Dovecot (ACL plugin and a metadata dict in every test
instance). An OK RENAME Proj Shared/Proj across, and `move carol Work b3`, left bob's grant and the
mailbox's comments behind (probe 2 of stop 47): boxattrs.py carries them before the messages.
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli, judge, seed
from test_several_proxies import ids

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
ODD = b"two\r\nlines \xc3\xa9 \"q\" \\"  # a value only a literal carries


def _direct(backend) -> Wire:
    w = Wire(backend.host, backend.port, timeout=60)
    w.login("carol")
    return w


def _attributes(backend, box: bytes) -> bytes:
    w = _direct(backend)
    got = b"".join(w.cmd(b"a", b'GETACL "%s"' % box) + w.cmd(
        b"m", b'GETMETADATA "%s" (/private/comment /shared/comment)' % box))
    w.close()
    return got


def _shared_and_noted(backend) -> None:
    """carol's Proj granted to bob and dave, with a private and a shared comment."""
    w = _direct(backend)
    for tag, command in ((b"s", b"SETACL Proj bob lrs"), (b"t", b"SETACL Proj dave lr")):
        assert w.cmd(tag, command)[-1].startswith(tag + b" OK")
    w.send(b'm SETMETADATA Proj (/private/comment "keep-me" /shared/comment {%d+}\r\n%s)\r\n' % (len(ODD), ODD))
    assert w.until_tagged(b"m")[-1].startswith(b"m OK")
    w.close()


def _moved_to_b3(proxy_factory, how: str) -> bytes:
    """carol's Proj on b1 moved to b3 (with its children) by a client's RENAME to Shared/Proj, or by the
    admin `move`; its name there."""
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    if how == "admin-move":
        moved = cli("move", "--config", str(proxy.config_path), "carol", "Proj", "b3")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        return b"Proj"
    c = Wire(proxy.host, proxy.port, timeout=120)
    c.login("carol")
    assert c.cmd(b"r", b"RENAME Proj Shared/Proj")[-1].startswith(b"r OK")
    c.close()
    return b"Shared/Proj"


@pytest.mark.parametrize("how", ["rename", "admin-move"])
def test_a_mailbox_moved_across_keeps_its_acl_and_metadata(proxy_factory, fleet, how):
    mail = ids("p", 3)
    seed(fleet["b1"], "carol", "Proj", mail)
    _shared_and_noted(fleet["b1"])
    before = _attributes(fleet["b1"], b"Proj")
    assert b"bob lrs" in before and b"keep-me" in before and ODD in before, before
    where, box = "b3", _moved_to_b3(proxy_factory, how).decode()
    after = _attributes(fleet[where], box.encode())
    assert b"bob lrs" in after and b"dave lr" in after, after
    assert b"keep-me" in after and ODD in after, after
    counts, found = census(fleet, "carol")
    assert judge(counts, mail) == ([], []) and {found[i][0] for i in mail} == {(where, box)}


def _acl(backend, box: bytes) -> dict[bytes, bytes]:
    """The ACL of carol's *box* on *backend*, carol's own entry left out."""
    w = _direct(backend)
    line = [x for x in w.cmd(b"a", b'GETACL "%s"' % box) if x.startswith(b"* ACL")][0]
    w.close()
    words = line.split()[3:]  # (* ACL "box" id rights ...: names here have no spaces)
    return {k: v for k, v in zip(words[::2], words[1::2]) if k != b"carol"}


@pytest.mark.parametrize("how", ["rename", "admin-move"])
def test_a_moved_mailbox_has_its_own_acl_only_and_keeps_a_nil_string(proxy_factory, fleet, how):
    """Probe 7 of stop 48: Dovecot gives a new mailbox its parent's ACL; the move only added the
    source's entries, so Shared/Proj/sub got dave's grant on Shared (and bob's on Proj, its own old
    parent's, after an admin move); and a METADATA value "NIL" was set as the atom NIL: deleted."""
    seed(fleet["b1"], "carol", "Proj", ids("q", 2))
    seed(fleet["b1"], "carol", "Proj/sub", ids("r", 2))
    w = _direct(fleet["b1"])
    for tag, command in ((b"s", b"SETACL Proj bob lrs"), (b"d", b"DELETEACL Proj/sub bob"),
                         (b"t", b"SETACL Proj/sub alice lr"), (b"m", b'SETMETADATA Proj/sub (/private/comment "NIL")')):
        assert w.cmd(tag, command)[-1].startswith(tag + b" OK")
    w.close()
    w = _direct(fleet["b3"])
    for tag, command in ((b"c", b"CREATE Shared"), (b"g", b"SETACL Shared dave lrw"), (b"p", b"CREATE Proj"),
                         (b"h", b"SETACL Proj dave lrw")):
        assert w.cmd(tag, command)[-1].startswith(tag + b" OK")
    assert w.cmd(b"x", b"DELETE Proj")[-1].startswith(b"x OK")  # (an admin move makes it again: no inheritance)
    w.close()
    box = _moved_to_b3(proxy_factory, how)
    assert _acl(fleet["b3"], box) == {b"bob": b"lrs"}
    assert _acl(fleet["b3"], box + b"/sub") == {b"alice": b"lr"}
    w = _direct(fleet["b3"])
    got = b"".join(w.cmd(b"m", b'GETMETADATA "%s/sub" (/private/comment)' % box))
    w.close()
    assert b"/private/comment {3}\r\nNIL)" in got or b'/private/comment "NIL")' in got, got


def test_a_whole_user_move_carries_the_servers_metadata(proxy_factory, fleet):
    """GETMETADATA "" answered NIL after `move carol '*' b2`: the entries stayed on b1 (probe 7, stop 48).
    RFC 5464's server entries are carried; a vendor's cannot be (Dovecot 2.3.19 lists none for a DEPTH)."""
    seed(fleet["b1"], "carol", "INBOX", ids("i", 2))
    w = _direct(fleet["b1"])
    assert w.cmd(b"m", b'SETMETADATA "" (/private/comment "server-note")')[-1].startswith(b"m OK")
    w.close()
    proxy = proxy_factory(MASTERS)
    moved = cli("move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    c = Wire(proxy.host, proxy.port, timeout=60)
    c.login("carol")
    got = b"".join(c.cmd(b"g", b'GETMETADATA "" (/private/comment)'))
    c.close()
    assert b"server-note" in got, got
