"""A CREATE Dovecot refuses as existing although it made the mailbox (scripted here). On real Dovecot
2.3.19 (maildir, ACL), 400 CREATEs of new names beside two sessions of the same user looping on
MYRIGHTS and LIST: 9 and 22 answered ``NO [ALREADYEXISTS] Mailbox already exists``, every one of
those mailboxes there afterwards, selectable and empty. A RENAME across then answered a valid RENAME
NO (tests/test_rename_brief_hold.py::test_rename_swap_valid_side, about one run in six under load,
and once in CI). mailops.create takes such a mailbox, empty, as made; anything else stays a refusal."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from referral_proxy.mailops import TransferError, create
from tests.test_cut_delete import _backend, _exchange, _result

REFUSED = b"TAG NO [ALREADYEXISTS] Mailbox already exists (0.004 + 0.000 + 0.003 secs).\r\n"
LISTED = b'* LIST (\\HasNoChildren) "/" Shared/X\r\nTAG OK List completed.\r\n'
NOT_LISTED = b"TAG OK List completed.\r\n"
ASK = b"STATUS Shared/X (UIDVALIDITY UIDNEXT MESSAGES)"


def _status(messages: int) -> bytes:
    return b"* STATUS Shared/X (MESSAGES %d UIDNEXT %d UIDVALIDITY 1796250777)\r\nTAG OK Status completed.\r\n" % (
        messages, messages + 1)


def test_a_create_refused_as_existing_that_made_the_mailbox_empty_is_taken():
    conn = _backend()
    d = defer.ensureDeferred(create(conn, "Shared/X"))
    _exchange(conn, b"CREATE Shared/X", REFUSED)
    _exchange(conn, b"LIST \"\" Shared/X", LISTED)
    _exchange(conn, ASK, _status(0))
    assert _result(d) is None
    assert conn.transport.value() == b""


@pytest.mark.parametrize("listed, messages", [(False, None), (True, 1)])
def test_a_create_refused_as_existing_is_a_refusal_if_it_is_not_there_or_holds_mail(listed, messages):
    conn = _backend()
    d = defer.ensureDeferred(create(conn, "Shared/X"))
    _exchange(conn, b"CREATE Shared/X", REFUSED)
    _exchange(conn, b"LIST \"\" Shared/X", LISTED if listed else NOT_LISTED)
    if messages is not None:
        _exchange(conn, ASK, _status(messages))
    with pytest.raises(TransferError, match=r"^\[ALREADYEXISTS\] CREATE failed on b1: Mailbox already exists"):
        _result(d)


def test_another_refusal_is_not_looked_at():
    conn = _backend()
    d = defer.ensureDeferred(create(conn, "Shared/X"))
    _exchange(conn, b"CREATE Shared/X", b"TAG NO [NOPERM] Permission denied\r\n")
    with pytest.raises(TransferError, match=r"^\[NOPERM\] CREATE failed on b1"):
        _result(d)
    assert conn.transport.value() == b""
