"""A CREATE Dovecot refuses as existing although it made the mailbox (scripted here). On real Dovecot
2.3.19 (maildir, ACL), 400 CREATEs of new names beside two sessions of the same user looping on
MYRIGHTS and LIST: 9 and 22 answered ``NO [ALREADYEXISTS] Mailbox already exists``, every one of
those mailboxes there afterwards, selectable and empty. A RENAME across then answered a valid RENAME
NO (tests/test_rename_brief_hold.py::test_rename_swap_valid_side, about one run in six under load,
and once in CI). mailops.create takes such a mailbox, empty, as made; anything else stays a refusal."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from referral_proxy.backend import BackendProtocol
from referral_proxy.config import BackendConfig
from referral_proxy.drain import remove_verified, resume
from referral_proxy.journal import JournalEntry, Step
from referral_proxy.mailops import TransferError, create
from referral_proxy.testing.fakes import NoDelayTransport
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


# -- the drain's drop (drain.py): a private name under the move's reserved aside, checked absent ---------------

DROP = b"referral-proxy-aside-0123abcd/drop-1"


class _Journal:
    def __init__(self) -> None:
        self.steps: list[Step] = []

    async def step(self, entry: JournalEntry, step: Step) -> None:
        self.steps.append(step)

    async def record(self, entry: JournalEntry) -> None:
        pass


def _mover_backend() -> BackendProtocol:
    conn = BackendProtocol(BackendConfig(name="b1", endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2"))
    conn.makeConnection(NoDelayTransport())
    conn.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS MOVE] ready\r\n")
    return conn


def test_the_drains_drop_refused_as_existing_and_made_is_used():
    """Past the commit point the drain moves the verified UIDs to a new drop. Its CREATE refused as
    existing (made): before, the drain stopped there (`move` answered "committed but not finished"),
    and recovery counted the UID MOVE that never ran as one Dovecot died on (two such: the drain's
    removals by STORE + EXPUNGE, which cannot tell a client's MOVE from its own)."""
    src, journal = _mover_backend(), _Journal()
    entry = JournalEntry(1, "carol", "move", {"settled": {}, "pairs": [["Work", "Work"]], "src": "b1"}, Step.PLACED)
    d = defer.ensureDeferred(remove_verified(journal, entry, 0, src, _mover_backend(), "Work",  # type: ignore[arg-type]
                                             "referral-proxy-aside-0123abcd/drop", [1, 2], {1, 2}))
    _exchange(src, b'LIST "" ' + DROP, NOT_LISTED)
    _exchange(src, b"CREATE " + DROP, REFUSED)
    _exchange(src, b'LIST "" ' + DROP, b'* LIST (\\HasNoChildren) "/" ' + DROP + b"\r\nTAG OK List completed.\r\n")
    _exchange(src, b"STATUS " + DROP + b" (UIDVALIDITY UIDNEXT MESSAGES)",
              b"* STATUS " + DROP + b" (MESSAGES 0 UIDNEXT 1 UIDVALIDITY 1796250777)\r\nTAG OK Status completed.\r\n")
    _exchange(src, b"UID MOVE 1:2 " + DROP, b"* OK [COPYUID 1796250777 1:2 1:2] Moved UIDs.\r\n"
              b"* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nTAG OK Move completed.\r\n")
    _exchange(src, b'LIST "" ' + DROP, b'* LIST (\\HasNoChildren) "/" ' + DROP + b"\r\nTAG OK List completed.\r\n")
    _exchange(src, b"STATUS " + DROP + b" (MESSAGES)",
              b"* STATUS " + DROP + b" (MESSAGES 2)\r\nTAG OK Status completed.\r\n")
    _exchange(src, b"DELETE " + DROP, b"TAG OK Delete completed.\r\n")
    assert _result(d) is None
    assert journal.steps == [Step.DROPPING, Step.DROPPED]
    assert entry.data["settled"] == {"0": "1:2"} and "move_deaths" not in entry.data
    assert src.transport.value() == b""


@pytest.mark.parametrize("made", [False, True])
def test_a_drain_cut_off_before_its_drop_was_made_counts_no_move_death(made):
    """Recovery of a drain journaled ``dropping`` whose UIDs are all still in the source: the UID MOVE
    took nothing. With its drop there, Dovecot may have died on it (counted: at MOVE_DEATHS the drain
    expunges instead); without, the MOVE never ran (its drop's CREATE refused, the process killed
    first): before, counted as a death too, so two refused drops cost the move its MOVE."""
    src, journal = _mover_backend(), _Journal()
    drop = b"referral-proxy-aside-0123abcd/drop"
    entry = JournalEntry(1, "carol", "move", {"settled": {}, "pairs": [["Work", "Work"]], "src": "b1",
                                              "validity": {"0": 7},
                                              "dropping": {"pair": 0, "box": "Work", "uids": "1:2",
                                                           "drop": DROP.decode(), "how": "move"}}, Step.DROPPING)
    d = defer.ensureDeferred(resume(journal, entry, src, src, drop.decode()))  # type: ignore[arg-type]
    _exchange(src, b'LIST "" Work', b'* LIST (\\HasNoChildren) "/" Work\r\nTAG OK List completed.\r\n')
    _exchange(src, b"EXAMINE Work", b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n* OK [UIDNEXT 3] next\r\n"
              b"TAG OK [READ-ONLY] Examine completed.\r\n")
    _exchange(src, b"UID SEARCH UID 1:2", b"* SEARCH 1 2\r\nTAG OK Search completed.\r\n")
    _exchange(src, b'EXAMINE "referral-proxy/no such mailbox"', b"TAG NO Mailbox doesn't exist\r\n")
    _exchange(src, b'LIST "" ' + DROP, (b'* LIST (\\HasNoChildren) "/" ' + DROP + b"\r\n" if made else b"")
              + b"TAG OK List completed.\r\n")
    for _conn in range(2):  # src and dst (the same here): what a crash left under the drop's name
        _exchange(src, b'LIST "" "' + drop + b'*"', b"TAG OK List completed.\r\n")
    assert _result(d) is None
    assert journal.steps == [Step.DROPPED]
    assert entry.data.get("move_deaths", 0) == (1 if made else 0)
