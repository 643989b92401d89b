"""STATUS of a mailbox made a moment ago while another session opens it for the first time:
Dovecot 2.3.19 answers ``UIDVALIDITY 0`` (scripted here; on real Dovecot, three sessions STATUSing a
just-CREATEd mailbox at once, one of them saw 0 in 123 of 200 rounds). A RENAME across into a new
mailbox, with a second proxy's session STATUSing in a loop, took that 0 for the destination's
UIDVALIDITY, met the real one in its APPENDUID and answered NO "a destination mailbox was replaced
during the move" (CI, test_list_during_moves, PostgreSQL case)."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from referral_proxy.mailops import UNSET_RETRIES, MailboxState, TransferError, status
from tests.test_cut_delete import _backend, _exchange, _result

ASK = b"STATUS Shared/W (UIDVALIDITY UIDNEXT MESSAGES)"


def _answer(validity: int) -> bytes:
    return b"* STATUS Shared/W (MESSAGES 0 UIDNEXT 1 UIDVALIDITY %d)\r\nTAG OK Status completed.\r\n" % validity


def test_a_uidvalidity_of_0_is_asked_again():
    conn = _backend()
    d = defer.ensureDeferred(status(conn, "Shared/W"))
    _exchange(conn, ASK, _answer(0))
    _exchange(conn, ASK, _answer(0))
    _exchange(conn, ASK, _answer(1796179821))
    assert _result(d) == MailboxState(1796179821, 1, 0)
    assert conn.transport.value() == b""


def test_a_uidvalidity_that_stays_0_is_an_error_not_a_value():
    conn = _backend()
    d = defer.ensureDeferred(status(conn, "Shared/W"))
    for _ in range(UNSET_RETRIES):
        _exchange(conn, ASK, _answer(0))
    with pytest.raises(TransferError, match="UIDVALIDITY 0"):
        _result(d)
