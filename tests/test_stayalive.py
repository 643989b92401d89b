"""A command the proxy carries out itself keeps its client hearing from it (stayalive.py): a COPY
across servers that waits on a stalled backend sends ``* OK Hang in there..`` every 15 s, as
Dovecot does during a long COPY, instead of a silence a client gives up on (and sends the COPY
again: the mail twice)."""

from __future__ import annotations

import os
import signal

import pytest
from imapwire import Wire
from movecheck import census, seed
from twisted.internet import defer

from referral_proxy import stayalive
from referral_proxy.testing.fakes import SessionHarness


def _task(h: SessionHarness, tag: bytes) -> defer.Deferred:
    """A command of the proxy's own that waits until the returned Deferred fires."""
    gate: defer.Deferred = defer.Deferred()

    async def work() -> None:
        await gate
        h.session.tagged(tag, "OK", "Done.")

    h.session.run(tag, work())
    return gate


def test_a_long_command_of_the_proxys_own_sends_hang_in_there_every_15_s():
    h = SessionHarness()
    h.login()
    h.to_client()
    gate = _task(h, b"t1")
    h.reactor.advance(stayalive.SECONDS - 1)
    assert h.to_client() == b""
    h.reactor.advance(1)
    assert h.to_client() == stayalive.LINE
    h.reactor.advance(stayalive.SECONDS)
    assert h.to_client() == stayalive.LINE
    gate.callback(None)
    h.turns()
    assert h.to_client() == b"t1 OK Done.\r\n"
    h.reactor.advance(10 * stayalive.SECONDS)
    assert h.to_client() == b""  # the timer ended with the command
    assert not h.reactor.getDelayedCalls() or all(
        c.getTime() > h.reactor.seconds() for c in h.reactor.getDelayedCalls())


def test_not_before_login():
    h = SessionHarness()
    h.to_client()
    gate = _task(h, b"t1")
    h.reactor.advance(3 * stayalive.SECONDS)
    assert h.to_client() == b""
    gate.callback(None)
    h.turns()
    assert h.to_client() == b"t1 OK Done.\r\n"


@pytest.mark.usefixtures("clean_mail")
def test_a_copy_across_to_a_stalled_server_keeps_its_client_hearing(fleet, proxy_factory):
    proxy = proxy_factory({"backends": {"b2": {"connect_timeout": 60}}},
                          rules=[{"user": "carol", "mailbox": "Far*", "backend": "b2"}])
    ids = [f"s-{i}@t" for i in range(3)]
    seed(fleet["b1"], "carol", "Work", ids)
    seed(fleet["b2"], "carol", "Far", [])
    w = Wire(proxy.host, proxy.port, timeout=90)
    w.login("carol", proxy.users["carol"])
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    group = os.getpgid(fleet["b2"].pid)
    os.killpg(group, signal.SIGSTOP)  # b2 accepts connections (the kernel does) and says nothing
    try:
        w.send(b"c UID COPY 1:* Far\r\n")
        first = w.line()
        assert first == stayalive.LINE, first
    finally:
        os.killpg(group, signal.SIGCONT)
    rest = w.until_tagged(b"c")
    assert rest[-1].startswith(b"c OK [COPYUID "), rest
    w.cmd(b"z", b"LOGOUT")
    counts, where = census(fleet, "carol")
    assert {i: counts[i] for i in ids} == {i: 2 for i in ids}  # the original and its one copy
    assert all(sorted(where[i]) == [("b1", "Work"), ("b2", "Far")] for i in ids), where
