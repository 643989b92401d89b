"""MULTIAPPEND emulated for a backend without it (scripted backends): all or nothing."""

from __future__ import annotations

from twisted.python.failure import Failure

from referral_proxy.append import uid_set
from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, SessionHarness

NO_MULTIAPPEND = [c for c in DOVECOT_CAPS if c != "MULTIAPPEND"]


def test_uid_set():
    assert uid_set([5, 6, 7, 9, 3, 4]) == b"5:7,9,3:4"
    assert uid_set([1]) == b"1"


def test_each_message_is_its_own_append_and_uids_are_joined():
    h = SessionHarness(connector=FakeConnector(capabilities=NO_MULTIAPPEND))
    h.login()
    h.send(b"a APPEND Box (\\Seen) {3+}\r\nabc (\\Flagged) {2+}\r\nde\r\n")
    assert h.to_backend() == b"rp1 APPEND Box (\\Seen) {3+}\r\nabc\r\nrp2 APPEND Box (\\Flagged) {2+}\r\nde\r\n"
    h.from_backend(b"rp1 OK [APPENDUID 7 10] done\r\n")
    assert h.to_client() == b""  # not before every message is answered
    h.from_backend(b"rp2 OK [APPENDUID 7 11] done\r\n")
    assert h.to_client() == b"a OK [APPENDUID 7 10:11] Append completed.\r\n"


def test_a_refused_message_rolls_back_the_saved_ones_by_uid():
    h = SessionHarness(connector=FakeConnector(capabilities=NO_MULTIAPPEND))
    h.login()
    session_backend = h.backend
    h.send(b"a APPEND Box {3+}\r\nabc {2+}\r\nde {1+}\r\nf\r\n")
    h.to_backend()
    h.from_backend(b"rp1 OK [APPENDUID 7 10] done\r\nrp2 NO [OVERQUOTA] Quota exceeded\r\n")
    h.from_backend(b"rp3 OK [APPENDUID 7 11] done\r\n")
    # A connection of its own removes exactly UIDs 10 and 11.
    rollback = h.backend
    assert rollback is not session_backend
    steps = [(b"rp1 SELECT Box\r\n", b"rp1 OK [READ-WRITE] selected\r\n"),
             (b"rp2 UID STORE 10:11 +FLAGS.SILENT (\\Deleted)\r\n", b"rp2 OK stored\r\n"),
             (b"rp3 UID EXPUNGE 10:11\r\n", b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nrp3 OK expunged\r\n")]
    for sent, answer in steps:
        assert h.to_client() == b""
        assert h.to_backend() == sent
        h.from_backend(answer)
    assert h.to_client() == b"a NO [OVERQUOTA] Quota exceeded\r\n"
    assert rollback.transport.disconnecting
    # The session's own connection saw nothing of the rollback and goes on.
    h.send(b"n NOOP\r\n")
    assert session_backend.transport.value().endswith(b"rp4 NOOP\r\n")


def test_client_leaving_mid_message_waits_for_answers_then_rolls_back():
    h = SessionHarness(connector=FakeConnector(capabilities=NO_MULTIAPPEND))
    h.login()
    conn = h.backend
    h.send(b"a APPEND Box {3+}\r\nabc {10+}\r\nhalf")
    assert h.to_backend() == b"rp1 APPEND Box {3+}\r\nabc\r\nrp2 APPEND Box {10+}\r\nhalf"
    h.session.connectionLost(Failure(ConnectionError("client gone")))
    assert not conn.transport.disconnecting  # message 1's answer is still to come
    h.from_backend(b"rp1 OK [APPENDUID 7 20] done\r\n")
    # Now the half message is aborted by closing, and message 1 is removed.
    assert conn.transport.disconnecting
    rollback = h.backend
    assert rollback is not conn
    assert rollback.transport.value() == b"rp1 SELECT Box\r\n"


def test_backend_without_literal_plus_gets_each_message_announced():
    caps = [c for c in NO_MULTIAPPEND if c != "LITERAL+"]
    h = SessionHarness(connector=FakeConnector(capabilities=caps))
    h.login()
    h.send(b"a APPEND Box {3}\r\n")
    assert h.to_backend() == b"rp1 APPEND Box {3}\r\n"
    h.from_backend(b"+ go\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"abc {2}\r\n")
    assert h.to_backend() == b"abc\r\nrp2 APPEND Box {2}\r\n"
    h.from_backend(b"rp2 NO [TRYCREATE] gone meanwhile\r\n")  # refused before its literal
    h.from_backend(b"rp1 OK [APPENDUID 3 4] ok\r\n")
    rollback = h.backend
    assert rollback.transport.value() == b"rp1 SELECT Box\r\n"


def test_home_backend_lost_mid_emulated_append_rolls_back_what_was_saved():
    h = SessionHarness(connector=FakeConnector(capabilities=NO_MULTIAPPEND))
    h.login()
    conn = h.backend
    h.send(b"a APPEND Box {3+}\r\nabc")
    h.from_backend(b"rp1 OK [APPENDUID 7 10] done\r\n")
    conn.connectionLost(Failure(ConnectionError("gone")))
    assert h.to_client().endswith(b"* BYE Mail server connection lost\r\n")
    h.session.connectionLost(Failure(ConnectionError("closed after the BYE")))
    # The message saved before the loss is removed, by UID, on a connection of its own.
    rollback = h.backend
    assert rollback is not conn
    assert rollback.transport.value() == b"rp1 SELECT Box\r\n"
