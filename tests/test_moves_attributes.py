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


@pytest.mark.parametrize("how", ["rename", "admin-move"])
def test_a_mailbox_moved_across_keeps_its_acl_and_metadata(proxy_factory, fleet, how):
    mail = ids("p", 3)
    seed(fleet["b1"], "carol", "Proj", mail)
    _shared_and_noted(fleet["b1"])
    before = _attributes(fleet["b1"], b"Proj")
    assert b"bob lrs" in before and b"keep-me" in before and ODD in before, before
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    if how == "rename":
        c = Wire(proxy.host, proxy.port, timeout=120)
        c.login("carol")
        assert c.cmd(b"r", b"RENAME Proj Shared/Proj")[-1].startswith(b"r OK")
        c.close()
        where, box = ("b3", "Shared/Proj")
    else:
        moved = cli("move", "--config", str(proxy.config_path), "carol", "Proj", "b3")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        where, box = ("b3", "Proj")
    after = _attributes(fleet[where], box.encode())
    assert b"bob lrs" in after and b"dave lr" in after, after
    assert b"keep-me" in after and ODD in after, after
    counts, found = census(fleet, "carol")
    assert judge(counts, mail) == ([], []) and {found[i][0] for i in mail} == {(where, box)}
