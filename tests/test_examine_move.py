"""MOVE to another backend from a mailbox opened with EXAMINE (read-only), against real Dovecot.

The source's \\Deleted is ignored there, so the old code copied the messages, found none
"still there", expunged its copies again and answered OK "No messages moved": an OK for
nothing, and copies that other sessions could see for a moment at the destination."""

from __future__ import annotations

import pytest
from imapwire import Wire
from mailcheck import contents

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]


def _msg(i: int) -> bytes:
    return b"From: a@example.test\r\nSubject: m%d\r\n\r\nbody %d\r\n" % (i, i)


def test_a_move_across_from_an_examined_mailbox_is_refused_and_nothing_is_copied(proxy_factory, fleet):
    with fleet["b3"].client("alice") as m:
        m.create("Shared/x")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"a APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(_msg(1)), _msg(1), len(_msg(2)), _msg(2)))
    assert w.until_tagged(b"a")[-1].startswith(b"a OK")
    before = contents(fleet["b1"], "alice", "INBOX")
    assert w.cmd(b"b", b"EXAMINE INBOX")[-1].startswith(b"b OK [READ-ONLY]")
    for tag, move in ((b"c", b"MOVE 1:* Shared/x"), (b"d", b"UID MOVE 1:* Shared/x")):
        reply = w.cmd(tag, move)
        assert reply[-1].startswith(tag + b" NO [READ-ONLY] "), reply
    assert contents(fleet["b1"], "alice", "INBOX") == before
    assert contents(fleet["b3"], "alice", "Shared/x") == []
    # A COPY from it is no change to it: carried out.
    assert w.cmd(b"e", b"COPY 1 Shared/x")[-1].startswith(b"e OK")
    assert len(contents(fleet["b3"], "alice", "Shared/x")) == 1
    # SELECTed again, the same MOVE moves.
    assert w.cmd(b"f", b"SELECT INBOX")[-1].startswith(b"f OK [READ-WRITE]")
    assert w.cmd(b"g", b"MOVE 2 Shared/x")[-1].startswith(b"g OK")
    w.close()
    assert [c[3] for c in contents(fleet["b1"], "alice", "INBOX")] == [before[0][3]]
    assert sorted(c[3] for c in contents(fleet["b3"], "alice", "Shared/x")) == sorted(c[3] for c in before)
