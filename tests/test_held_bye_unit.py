"""A BYE from the backend a session ends with is held until the connection closes (lastanswers.held_bye).

Dovecot closes right after such a BYE; a backend that does not (another server, a proxy in between that keeps
the socket) left the client waiting for good: nothing more was read from it and its BYE never written. The
backend is scripted: Dovecot cannot be made to keep a connection open after its BYE."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from referral_proxy.lastanswers import ANSWER_WAIT
from referral_proxy.testing.fakes import SessionHarness


def _tags(sent: bytes) -> list[bytes]:
    return [line.split(b" ", 1)[0] for line in sent.split(b"\r\n") if line.startswith(b"rp")]


def test_a_bye_whose_backend_keeps_the_connection_open_ends_the_session_all_the_same():
    h = SessionHarness()
    h.login()
    h.send(b"s SELECT Work\r\n")
    (tag,) = _tags(h.to_backend())
    h.from_backend(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\n%s OK [READ-WRITE] Select completed.\r\n" % tag)
    assert h.to_client().endswith(b"s OK [READ-WRITE] Select completed.\r\n")
    h.send(b"n NOOP\r\nm NOOP\r\n")
    h.from_backend(b"* BYE IMAP session state is inconsistent, please relogin.\r\n")  # and the socket stays open
    assert h.to_client() == b""  # held: it comes last
    h.reactor.advance(ANSWER_WAIT / 2)
    assert not h.backend.transport.disconnecting  # Dovecot's own close is waited for a while
    h.reactor.advance(ANSWER_WAIT / 2)
    assert h.backend.transport.disconnecting  # main: never; the client waited for good
    h.backend.connectionLost(Failure(ConnectionDone()))
    h.turns()
    out = h.to_client()
    assert out.endswith(b"* BYE IMAP session state is inconsistent, please relogin.\r\n"), out
    assert b"m " not in out  # what was not read is not run
