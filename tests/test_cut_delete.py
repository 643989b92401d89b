"""A private mailbox whose DELETE a killed Dovecot cut off (scripted backend: Dovecot leaves this
only when killed between marking the index deleted and removing the files, as the soak did)."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from referral_proxy.aside import _mark, delete_if_empty, finish_cut_delete, hidden_messages
from referral_proxy.backend import BackendProtocol
from referral_proxy.config import BackendConfig
from referral_proxy.mailops import NotReadAgain
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


def _expunging(conn: BackendProtocol, uids: bytes, untagged: bytes, still: bytes = b"") -> None:
    """mailops.expunge_uids' round: the STORE and the UID EXPUNGE of *uids* in one write, answered (the
    EXPUNGE with *untagged*); then its look for them, answered with *still* (UIDs still there)."""
    sent = conn.transport.value()
    conn.transport.clear()
    (t1, store), (t2, expunge) = (line.split(b" ", 1) for line in sent.split(b"\r\n")[:-1])
    assert (store, expunge) == (b"UID STORE " + uids + b" +FLAGS.SILENT (\\Deleted)", b"UID EXPUNGE " + uids), sent
    conn.dataReceived(t1 + b" OK done\r\n" + untagged + t2 + b" OK Expunge completed.\r\n")
    _exchange(conn, b"UID SEARCH UID " + uids, b"* SEARCH" + (b" " + still if still else b"") + b"\r\nTAG OK done\r\n")


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
    _exchange(conn, b'LIST "" "%s/*"' % ASIDE.encode(), b"TAG OK\r\n")  # no child left under it
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


def test_a_drop_the_backend_will_not_delete_is_emptied_and_left_and_the_source_selected_again():
    """drain.py's drop, settled, refused by DELETE (seen in the soak: a drop a SIGKILLed Dovecot half
    deleted, 'Mailbox exists' to every DELETE and CREATE after): emptied, logged and left, the source
    selected again, the drain goes on (each use of a drop has a name of its own: drain._next_drop).
    Before, the DELETE's NO stopped the drain at every recovery and the move's names stayed reserved."""
    from referral_proxy.drain import _gone, _next_drop

    drop = "referral-proxy-aside-0123abcd/drop-1"
    conn = _backend()
    d = defer.ensureDeferred(_gone(conn, drop, selected="Work"))
    _exchange(conn, b'LIST "" %s' % drop.encode(), b'* LIST () "/" %s\r\nTAG OK done\r\n' % drop.encode())
    _exchange(conn, b"STATUS %s (MESSAGES)" % drop.encode(), b"* STATUS %s (MESSAGES 2)\r\nTAG OK done\r\n" % drop.encode())
    _exchange(conn, b"DELETE %s" % drop.encode(), b"TAG NO Mailbox exists (0.001 + 0.000 secs).\r\n")
    _exchange(conn, b"SELECT %s" % drop.encode(), b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\nTAG OK done\r\n")
    _exchange(conn, b"UID SEARCH ALL", b"* SEARCH 3 4\r\nTAG OK done\r\n")
    _expunging(conn, b"3:4", b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\n")  # gone, both
    _exchange(conn, b'EXAMINE "referral-proxy/no such mailbox"', b"TAG NO no such mailbox\r\n")
    _exchange(conn, b"SELECT Work", b"* 5 EXISTS\r\n* OK [UIDVALIDITY 9] x\r\nTAG OK done\r\n")
    assert _result(d) is None
    data: dict = {}
    assert [_next_drop(data, "b/drop") for _ in range(3)] == ["b/drop-1", "b/drop-2", "b/drop-3"]
    assert data == {"drops": 3}  # journaled with the step that uses it


def test_an_aside_listed_but_not_there_is_not_an_endless_examine_failure():
    """Dovecot lists a mailbox DELETEd with a child under it (in the session that deleted it) yet
    opens it no more: seen in the soak as recovery stuck on 'EXAMINE failed ... undo-0'. With no child
    left under it (put back first), it counts as gone and the name itself is looked at."""
    conn = _backend()
    d = defer.ensureDeferred(delete_if_empty(conn, "Work", ASIDE, "/"))
    _exchange(conn, b'LIST "" "%s/*"' % ASIDE.encode(), b"TAG OK\r\n")
    _exchange(conn, b'LIST "" %s' % ASIDE.encode(), b'* LIST (\\HasChildren) "/" %s\r\nTAG OK\r\n' % ASIDE.encode())
    gone = b"TAG NO [NONEXISTENT] Mailbox doesn't exist: %s\r\n" % ASIDE.encode()
    _exchange(conn, b"STATUS %s (MESSAGES)" % ASIDE.encode(), gone)  # listed, yet not there: not there (exists)
    _exchange(conn, b"RENAME Work %s" % ASIDE.encode(), b"TAG NO [NONEXISTENT] Mailbox doesn't exist: Work\r\n")
    _exchange(conn, b'LIST "" Work', b"TAG OK\r\n")
    assert _result(d) is True


def _scripted(caps: bytes) -> BackendProtocol:
    conn = BackendProtocol(BackendConfig(name="b1", endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2"))
    conn.makeConnection(NoDelayTransport())
    conn.dataReceived(b"* OK [CAPABILITY " + caps + b"] ready\r\n")
    return conn


def _appended(conn: BackendProtocol, first: bytes, bodies: list[bytes], answer: bytes) -> None:
    """An APPEND whose line ends in *first*: each literal after a ``+`` only (as a careful client)."""
    sent = conn.transport.value()
    conn.transport.clear()
    tag, _, text = sent.partition(b" ")
    assert text == b"APPEND " + ASIDE.encode() + first + b"\r\n", sent
    for body in bodies:
        conn.dataReceived(b"+ OK\r\n")
        assert conn.transport.value() == body, conn.transport.value()
        conn.transport.clear()
    conn.dataReceived(tag + b" " + answer + b"\r\n")


@pytest.mark.parametrize("multiappend", [True, False])
def test_hidden_messages_saves_two_marks_reads_the_mailbox_and_expunges_them(multiappend):
    """Both marks (new/ and cur/) in one MULTIAPPEND, or in two APPENDs on a backend without it."""
    conn = _scripted(b"IMAP4rev1 LITERAL+ UIDPLUS UNSELECT" + (b" MULTIAPPEND" if multiappend else b""))
    mark = _mark(ASIDE)
    size = b"{%d}" % len(mark)
    d = defer.ensureDeferred(hidden_messages(conn, ASIDE))
    if multiappend:
        _appended(conn, b" " + size, [mark + b" (\\Seen \\Deleted) " + size + b"\r\n", mark + b"\r\n"],
                  b"OK [APPENDUID 7 5:6] Append completed.")
    else:
        _appended(conn, b" " + size, [mark + b"\r\n"], b"OK [APPENDUID 7 5] Append completed.")
        _appended(conn, b" (\\Seen \\Deleted) " + size, [mark + b"\r\n"], b"OK [APPENDUID 7 6] Append completed.")
    _exchange(conn, b"SELECT " + ASIDE.encode(), b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\nTAG OK selected\r\n")
    _expunging(conn, b"5:6", b"* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n")
    _exchange(conn, b"UID SEARCH ALL", b"* SEARCH 3\r\nTAG OK searched\r\n")  # one Dovecot had lost
    _exchange(conn, b"UNSELECT", b"TAG OK\r\n")
    assert _result(d) == 1


def test_marks_refused_say_so_and_nothing_is_selected():
    conn = _scripted(b"IMAP4rev1 LITERAL+ UIDPLUS UNSELECT MULTIAPPEND")
    d = defer.ensureDeferred(hidden_messages(conn, ASIDE))
    sent = conn.transport.value()
    conn.transport.clear()
    conn.dataReceived(sent.partition(b" ")[0] + b" NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n")
    with pytest.raises(NotReadAgain):
        _result(d)
    assert conn.transport.value() == b""


def test_an_expunge_answered_ok_that_kept_a_message_fails_as_a_no_would():
    """Soak C seed 76065: Dovecot answered UID EXPUNGE OK and kept the message (\\Deleted, still there
    2 s later). Every removal of exactly these UIDs (a roll-back's, a take-back's, recovery's, the
    drain's) now looks after it: one still there is done again, EXPUNGE_TRIES in all, then fails it,
    and the step is tried again later."""
    from referral_proxy.mailops import EXPUNGE_TRIES, TransferError, expunge_uids

    conn = _backend()
    d = defer.ensureDeferred(expunge_uids(conn, [52, 53]))
    _expunging(conn, b"52:53", b"* 4 EXPUNGE\r\n", still=b"52")
    for _ in range(EXPUNGE_TRIES - 1):
        _expunging(conn, b"52", b"", still=b"52")
    with pytest.raises(TransferError, match="52 still there"):
        _result(d)


def test_a_message_whose_deleted_flag_a_client_cleared_meanwhile_is_flagged_and_expunged_again():
    """Stop 51's note: a recovery finishing a MOVE (and every other removal by UID) failed whenever a
    client cleared \\Deleted on a source between the STORE and the UID EXPUNGE (a client looping
    -FLAGS \\Deleted stalled it for good). The two go in one write now, and one kept is done again."""
    from referral_proxy.mailops import expunge_uids

    conn = _backend()
    untagged: list[bytes] = []
    d = defer.ensureDeferred(expunge_uids(conn, [7, 8, 9], untagged))
    _expunging(conn, b"7:9", b"* 1 EXPUNGE\r\n* 1 FETCH (UID 8 FLAGS ())\r\n* 2 EXPUNGE\r\n", still=b"8")
    _expunging(conn, b"8", b"* 1 EXPUNGE\r\n")
    assert _result(d).ok
    assert untagged == [b"* 1 EXPUNGE\r\n", b"* 1 FETCH (UID 8 FLAGS ())\r\n", b"* 2 EXPUNGE\r\n", b"* 1 EXPUNGE\r\n"]
    assert conn.transport.value() == b""
