"""halfclose.py on a scripted backend: after the client's half-close, what it sent whole is answered and
then the connection closes; what the end cut (half a line, half a message, an IDLE) closes it at once and
nothing of it reaches the backend whole. The real-Dovecot side: test_hostile18_halfclose.py."""

from __future__ import annotations

import pytest

from referral_proxy.halfclose import POLL_SECONDS
from referral_proxy.testing.fakes import SessionHarness


def _closing(h: SessionHarness) -> bool:
    return h.client.disconnecting or h.client.disconnected


def _half_close(h: SessionHarness) -> None:
    h.session.readConnectionLost()
    h.turns()


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_commands_in_flight_are_answered_before_the_close(bytewise):
    h = SessionHarness()
    h.login()
    msg = b"Subject: x\r\n\r\nhi\r\n"
    h.send(b"a NOOP\r\nb APPEND Work {%d+}\r\n" % len(msg) + msg + b"\r\nc STATUS INBOX (MESSAGES)\r\n",
           one_byte_at_a_time=bytewise)
    _half_close(h)
    for _ in range(5):
        h.reactor.advance(POLL_SECONDS)
    assert not _closing(h)
    sent = h.to_backend()
    tags = [line.split(b" ", 1)[0] for line in sent.split(b"\r\n") if line.startswith(b"rp")]
    assert len(tags) >= 2, sent
    h.from_backend(b"".join(b"%s OK done\r\n" % t for t in tags))
    sent = h.to_backend()  # (STATUS goes once the APPEND is answered, if it waited)
    more = [line.split(b" ", 1)[0] for line in sent.split(b"\r\n") if line.startswith(b"rp")]
    h.from_backend(b"".join(b"* STATUS INBOX (MESSAGES 1)\r\n%s OK done\r\n" % t for t in more))
    h.reactor.advance(POLL_SECONDS)
    out = h.to_client()
    assert [line.split(b" ")[0] for line in out.split(b"\r\n") if line[:2] in (b"a ", b"b ", b"c ")] == [b"a", b"b", b"c"]
    assert _closing(h)


@pytest.mark.parametrize("cut", [b"a NOO", b"a APPEND Work {10+}\r\nhalf", b"a IDLE\r\n"], ids=["line", "message", "idle"])
def test_what_the_end_cut_closes_at_once(cut):
    h = SessionHarness()
    h.login()
    h.send(cut)
    if cut.endswith(b"IDLE\r\n"):
        h.from_backend(b"+ idling\r\n")
    _half_close(h)
    assert _closing(h)


def test_a_session_with_nothing_in_flight_closes_at_once():
    h = SessionHarness()
    h.login()
    _half_close(h)
    assert _closing(h)
