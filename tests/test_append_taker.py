"""Sync APPENDs the proxy says "+" to itself (appends.Taker), against real Dovecot: the
command reaches the backend only with the literal's first bytes. A client dying at every
byte, two sessions appending to one mailbox, another session filling the quota midway;
judged by a census of the backend (every message by its content), not by the answers."""

from __future__ import annotations

import hashlib
import time

import pytest
from imapwire import Wire, wait_for
from mailcheck import contents

pytestmark = pytest.mark.usefixtures("clean_mail")


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _append(w: Wire, tag: bytes, box: bytes, body: bytes) -> bytes:
    """One APPEND with a synchronizing literal; its tagged answer."""
    w.send(b"%s APPEND %s {%d}\r\n" % (tag, box, len(body)))
    line = w.line()
    if not line.startswith(b"+"):
        return line
    w.send(body + b"\r\n")
    return w.until_tagged(tag)[-1]


def test_a_client_dying_at_every_byte_of_an_append_the_proxy_took_leaves_nothing(proxy_factory, fleet):
    backend = fleet["b1"]
    with backend.client("alice") as m:
        m.create("Box")
    proxy = proxy_factory()
    first = b"Subject: first\r\n\r\nkept\r\n"
    second = b"Subject: second\r\n\r\nx1 CREATE Smuggled\r\n"  # a body that is IMAP commands
    wire = b"b APPEND Box {%d}\r\n" % len(second) + second + b"\r\n"
    cuts = range(len(wire) - 1)  # every byte but the last: the command is never whole
    for cut in cuts:
        w = Wire(proxy.host, proxy.port)
        w.login()
        assert _append(w, b"a", b"Box", first).startswith(b"a OK [APPENDUID ")
        head = wire.index(b"\r\n") + 2
        w.send(wire[:min(cut, head)])
        if cut >= head:
            assert w.line() == b"+ Ready for literal data\r\n"  # the proxy's own (the target just took one)
            w.send(wire[head:cut])
        w.close()
    wait_for(lambda: len(contents(backend, "alice", "Box")) >= len(cuts), "every first message saved")
    time.sleep(0.5)  # the proxy's backend connections of the cut commands are gone by now
    saved = contents(backend, "alice", "Box")
    assert [s[3] for s in saved] == [_digest(first)] * len(cuts)  # each first once, no second at all
    with backend.client("alice") as m:
        assert all(b"Smuggled" not in line for line in m.list()[1])


def test_two_sessions_appending_to_one_mailbox_each_message_once(proxy_factory, fleet):
    backend = fleet["b1"]
    with backend.client("alice") as m:
        m.create("Shared")
    proxy = proxy_factory()
    a, b = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    a.login()
    b.login()
    bodies = []
    for i in range(15):
        for name, w in ((b"a", a), (b"b", b)):
            body = b"Subject: %s %d\r\n\r\n" % (name, i) + b"line\r\n" * (1 + i * 40)
            bodies.append(body)
            assert _append(w, name + b"%d" % i, b"Shared", body).startswith(name + b"%d OK [APPENDUID " % i)
    a.close()
    b.close()
    saved = contents(backend, "alice", "Shared")
    assert sorted(s[3] for s in saved) == sorted(_digest(x) for x in bodies)


def test_another_session_filling_the_quota_midway_refuses_after_the_body_and_nothing_runs(proxy_factory, fleet):
    """The proxy said "+" from the room it knew; Dovecot, its quota filled meanwhile by another
    session, refuses after the literal: NO [OVERQUOTA] relayed, nothing saved, nothing of the
    body run; the next APPEND there is asked of the backend first again."""
    backend = fleet["b1"]
    backend.reset_mail("quota")  # 20 KB of storage
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login("quota")
    first = b"Subject: first\r\n\r\n" + b"a" * 2000 + b"\r\n"
    assert _append(w, b"a", b"INBOX", first).startswith(b"a OK [APPENDUID ")
    filler = b"Subject: filler\r\n\r\n" + b"f" * 16000 + b"\r\n"
    with backend.client("quota") as m:
        assert m.append("INBOX", None, None, filler)[0] == "OK"
    body = b"Subject: third\r\n\r\n" + b"x1 CREATE Smuggled\r\nx2 DELETE INBOX\r\n" * 120  # ~4.4 KB
    w.send(b"b APPEND INBOX {%d}\r\n" % len(body))
    assert w.line() == b"+ Ready for literal data\r\n"  # the room known before the filler took it
    w.send(body + b"\r\n")
    assert w.until_tagged(b"b")[-1].startswith(b"b NO [OVERQUOTA] ")
    w.send(b"c APPEND INBOX {%d}\r\n" % len(body))  # refused: the backend decides before the data now
    assert w.line().startswith(b"c NO [OVERQUOTA] ")
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
    saved = contents(backend, "quota", "INBOX")
    assert sorted(s[3] for s in saved) == sorted([_digest(first), _digest(filler)])
    with backend.client("quota") as m:
        assert all(b"Smuggled" not in line for line in m.list()[1])


@pytest.mark.parametrize("verb", [b"DELETE T", b"RENAME T T2"])
def test_another_session_deleting_the_mailbox_makes_the_next_append_ask_before_its_body(proxy_factory, fleet, verb):
    """The proxy said "+" to an APPEND to T, which had taken this session's message a moment ago, after
    another session deleted T: 200 KB taken, then NO [TRYCREATE]; Dovecot refuses before the body (probe
    2 of stop 49). A DELETE or RENAME by any session of the user's now makes the next APPEND ask first."""
    with fleet["b1"].client("alice") as m:
        m.create("T")
    proxy = proxy_factory()
    a, b = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    a.login()
    b.login()
    assert _append(a, b"a", b"T", b"Subject: one\r\n\r\none\r\n").startswith(b"a OK [APPENDUID ")
    assert b.cmd(b"b", verb)[-1].startswith(b"b OK")
    a.send(b"c APPEND T {200030}\r\n")
    assert a.line().startswith(b"c NO [TRYCREATE]")  # not "+": nothing of the body asked for
    assert a.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    a.close()
    b.close()
