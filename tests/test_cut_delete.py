"""A private mailbox whose DELETE a killed Dovecot cut off (scripted backend: Dovecot leaves this
only when killed between marking the index deleted and removing the files, as the soak did)."""

from __future__ import annotations

from twisted.internet import defer

from referral_proxy.backend import BackendProtocol
from referral_proxy.config import BackendConfig
from referral_proxy.mailops import delete_if_empty, finish_cut_delete
from referral_proxy.testing.fakes import NoDelayTransport

ASIDE = "referral-proxy-aside-0123abcd/undo-0"
HALF = b"NO Mailbox was deleted under us (0.001 + 0.000 secs)."


def _backend() -> BackendProtocol:
    conn = BackendProtocol(BackendConfig(name="b1", endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2"))
    conn.makeConnection(NoDelayTransport())
    conn.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
    return conn


def _exchange(conn: BackendProtocol, expect: bytes, answer: bytes) -> None:
    """The next command sent must be *expect* (without its tag); *answer* it (tagged lines get the tag)."""
    sent = conn.transport.value()
    conn.transport.clear()
    tag, _, text = sent.partition(b" ")
    assert text == expect + b"\r\n", sent
    conn.dataReceived(answer.replace(b"TAG ", tag + b" "))


def _result(d: defer.Deferred) -> object:
    out: list = []
    d.addBoth(out.append)
    assert out, "still waiting"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_a_half_deleted_aside_is_deleted_again():
    conn = _backend()
    d = defer.ensureDeferred(finish_cut_delete(conn, ASIDE))
    _exchange(conn, b"STATUS %s (MESSAGES)" % ASIDE.encode(), b"TAG " + HALF + b"\r\n")
    _exchange(conn, b"DELETE %s" % ASIDE.encode(), b"TAG OK Delete completed.\r\n")
    assert _result(d) is True


def test_an_aside_that_opens_is_not_deleted_blindly():
    conn = _backend()
    d = defer.ensureDeferred(finish_cut_delete(conn, ASIDE))
    _exchange(conn, b"STATUS %s (MESSAGES)" % ASIDE.encode(),
              b"* STATUS %s (MESSAGES 3)\r\nTAG OK done\r\n" % ASIDE.encode())
    assert _result(d) is False
    assert conn.transport.value() == b""  # no DELETE


def test_a_roll_back_finds_its_aside_half_deleted_and_finishes():
    """delete_if_empty (a roll-back's) meets its own aside, half deleted by a killed Dovecot:
    deleted again, then the name itself looked at (here: gone), not an endless 'NOT recovered'."""
    conn = _backend()
    d = defer.ensureDeferred(delete_if_empty(conn, "Proj", ASIDE, "/"))
    _exchange(conn, b'LIST "" %s' % ASIDE.encode(), b'* LIST (\\HasNoChildren) "/" %s\r\nTAG OK\r\n' % ASIDE.encode())
    _exchange(conn, b"STATUS %s (MESSAGES)" % ASIDE.encode(), b"TAG " + HALF + b"\r\n")
    _exchange(conn, b"DELETE %s" % ASIDE.encode(), b"TAG OK Delete completed.\r\n")
    _exchange(conn, b"RENAME Proj %s" % ASIDE.encode(), b"TAG NO Mailbox doesn't exist: Proj\r\n")
    _exchange(conn, b'LIST "" Proj', b"TAG OK\r\n")
    assert _result(d) is True


def test_a_half_deleted_aside_dovecot_will_not_delete_is_left_and_the_move_goes_on():
    """Seen in the soak: the second DELETE answered 'Mailbox exists' (until Dovecot restarted). It
    holds no mail for anyone: left as it is (and logged), not an error that keeps the move's
    reservations for good."""
    conn = _backend()
    d = defer.ensureDeferred(finish_cut_delete(conn, ASIDE))
    _exchange(conn, b"STATUS %s (MESSAGES)" % ASIDE.encode(), b"TAG " + HALF + b"\r\n")
    _exchange(conn, b"DELETE %s" % ASIDE.encode(), b"TAG NO Mailbox exists (0.001 + 0.000 secs).\r\n")
    assert _result(d) is True
