"""Cross-server MOVE corners a real Dovecot will not produce on demand (scripted backends)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from storehelp import now
from twisted.python.failure import Failure

from referral_proxy.config import parse_config
from referral_proxy.referrals import referable
from referral_proxy.testing.fakes import SessionHarness


def _config(**proxy):
    return parse_config({
        "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"], **proxy},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"},
                     "b2": {"endpoint": "tcp:host=127.0.0.3:port=1", "url": "imap://127.0.0.3:1"},
                     "self": {"endpoint": "tcp:host=127.0.0.1:port=1143", "url": "imap://127.0.0.1:1143"}},
        "map": {"default": "b1", "rules": [{"mailbox": "Shared/*", "backend": "b2"},
                                           {"mailbox": "Loop/*", "backend": "self"}]},
    }, base=Path("."))


def _selected(exists: int) -> tuple[SessionHarness, object]:
    """A logged-in session with INBOX (of *exists* messages) selected on b1; (harness, b1)."""
    h = SessionHarness(_config())
    h.login()
    src = h.backend
    h.send(b"s SELECT INBOX\r\n")
    _take(src)
    h.from_backend(b"* %d EXISTS\r\nrp1 OK [READ-WRITE] Selected\r\n" % exists)
    h.to_client()
    return h, src


def _take(conn) -> bytes:
    data = conn.transport.value()
    conn.transport.clear()
    return data


def _two_copied(h, src) -> object:
    """``MOVE 1:2 Shared/X`` of UIDs 7 (\\Seen) and 8 (\\Deleted $Work) answered up to the copies' check (5, 6);
    the source is asked next which are there; the destination."""
    h.send(b"m MOVE 1:2 Shared/X\r\n")
    assert _take(src) == b"rp2 UID SEARCH 1:2\r\n"
    src.dataReceived(b"* SEARCH 7 8\r\nrp2 OK\r\n")
    dst = h.backend
    assert dst is not src  # the transfer's own connection
    assert _take(dst) == b'rp1 LIST "" Shared/X\r\n'
    dst.dataReceived(b'* LIST () "/" Shared/X\r\nrp1 OK\r\n')
    assert _take(src) == b"rp3 UID FETCH 7:8 (UID FLAGS INTERNALDATE RFC822.SIZE)\r\n"
    src.dataReceived(b'* 1 FETCH (UID 7 FLAGS (\\Seen \\Recent) INTERNALDATE "01-Jan-2020 10:00:00 +0000" RFC822.SIZE 3)\r\n'
                     b'* 2 FETCH (UID 8 FLAGS (\\Deleted $Work) INTERNALDATE "02-Jan-2020 10:00:00 +0000" RFC822.SIZE 2)\r\n'
                     b"rp3 OK\r\n")
    # Journaled before the destination can commit: both mailboxes' UIDVALIDITY, the destination's UIDNEXT.
    assert _take(src) == b"rp4 STATUS INBOX (UIDVALIDITY UIDNEXT MESSAGES)\r\n"
    src.dataReceived(b"* STATUS INBOX (UIDVALIDITY 3 UIDNEXT 9 MESSAGES 2)\r\nrp4 OK\r\n")
    assert _take(dst) == b"rp2 STATUS Shared/X (UIDVALIDITY UIDNEXT MESSAGES)\r\n"
    dst.dataReceived(b"* STATUS Shared/X (UIDVALIDITY 9 UIDNEXT 5 MESSAGES 4)\r\nrp2 OK\r\n")
    (entry,) = now(h.context.mailbox_map.entries())
    assert entry.step.value == "move-appending" and entry.data["dst_uidnext"] == 5
    # One FETCH for every body; a delivery meanwhile is kept for the client.
    assert _take(src) == b"rp5 UID FETCH 7:8 (UID BODY.PEEK[])\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 BODY[] {3}\r\nabc)\r\n* 3 EXISTS\r\n"
                     b"* 2 FETCH (UID 8 BODY[] {2}\r\nde)\r\nrp5 OK\r\n")
    # One MULTIAPPEND; \Recent is not copied, keywords are.
    assert _take(dst) == (b'rp3 APPEND Shared/X (\\Seen) "01-Jan-2020 10:00:00 +0000" {3+}\r\nabc'
                          b' (\\Deleted $Work) "02-Jan-2020 10:00:00 +0000" {2+}\r\nde\r\n')
    assert h.to_client() == b""
    dst.dataReceived(b"rp3 OK [APPENDUID 9 5:6] Append completed.\r\n")
    # The copies are read back and compared by content before the source is touched.
    assert _take(dst) == b"rp4 EXAMINE Shared/X\r\n"
    dst.dataReceived(b"* 6 EXISTS\r\n* OK [UIDVALIDITY 9] UIDs valid\r\nrp4 OK [READ-ONLY] Examined\r\n")
    assert _take(dst) == b"rp5 UID FETCH 5:6 (UID BODY.PEEK[])\r\n"
    dst.dataReceived(b"* 5 FETCH (UID 5 BODY[] {3}\r\nabc)\r\n* 6 FETCH (UID 6 BODY[] {2}\r\nde)\r\nrp5 OK\r\n")
    assert now(h.context.mailbox_map.entries())[0].step.value == "move-appended"
    return dst


_BOTH_DELETED = b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\n"


def _expunge_write(src, tag: int, flags: bytes, answer: bytes) -> None:
    """UIDs 7:8 read (their flags, *flags* answers), flagged and expunged in one write, tags *tag* to *tag* + 2;
    *answer*: the UID EXPUNGE's answer (its tag as %d)."""
    assert _take(src) == (b"rp%d UID FETCH 7:8 (UID FLAGS)\r\nrp%d UID STORE 7:8 +FLAGS.SILENT (\\Deleted)\r\n"
                          b"rp%d UID EXPUNGE 7:8\r\n" % (tag, tag + 1, tag + 2))
    src.dataReceived(flags + b"rp%d OK\r\nrp%d OK\r\n" % (tag, tag + 1) + answer % (tag + 2))


def test_move_whose_source_expunge_fails_takes_its_copies_back_and_restores_flags():
    """The source's UID EXPUNGE refused: its flags restored, the copies taken back, the client told Dovecot's
    reason (before, the copies were left for recovery to finish the move: never without master users)."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    # Only now the source: exactly these UIDs, those that are still there.
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"  # which are there right before the flag, and how
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 7:8 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\nrp7 OK\r\n")  # 8 unchanged: \\Deleted already
    assert _take(src) == b"rp8 UID FETCH 8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\nrp8 OK\r\n")
    assert now(h.context.mailbox_map.entries())[0].data["present"] == "7:8"
    # Flagged again with the UID EXPUNGE, in one write (a session clearing \Deleted between: probe r3, stop 50).
    # (their flags read in that write too: a change another session made until then reaches the copies)
    _expunge_write(src, 9, _BOTH_DELETED, b"rp%d NO [SERVERBUG] Expunge failed\r\n")
    # Message 7 was not \Deleted before the MOVE: its flag is restored; 8 keeps its own.
    assert _take(src) == b"rp12 UID STORE 7 -FLAGS.SILENT (\\Deleted)\r\n"
    src.dataReceived(b"rp12 OK\r\n")
    assert _take(src) == b"rp13 UID SEARCH UID 7:8\r\n"  # which stayed: both
    src.dataReceived(b"* SEARCH 7 8\r\nrp13 OK\r\n")
    (entry,) = now(h.context.mailbox_map.entries())  # the decision journaled first: nothing to expunge, copies back
    assert entry.step.value == "move-expunging" and (entry.data["present"], entry.data["vanished_dst"]) == ("", "5:6")
    _copy_taken_back(dst, b"5:6")
    assert h.to_client() == (b"* 3 EXISTS\r\nm NO [SERVERBUG] UID EXPUNGE failed on b1: Expunge failed; those still "
                             b"in the source were not moved\r\n")
    assert now(h.context.mailbox_map.entries()) == []


def test_a_copy_whose_source_vanished_meanwhile_is_taken_back():
    h, src = _selected(1)
    dst = _copied_of_one(h, src)
    src.dataReceived(b"* 1 EXPUNGE\r\nrp6 OK\r\n")  # another session moved it away meanwhile: before any flag
    assert _take(src) == b"rp7 UID FETCH 4 (UID FLAGS)\r\n"  # (asked again once told: probe b2 of stop 54)
    src.dataReceived(b"rp7 OK\r\n")
    _copy_taken_back(dst)  # it would be a second one
    assert h.to_client() == b"* 1 EXPUNGE\r\nm OK No messages moved (they were gone).\r\n"
    assert _take(src) == b""
    assert now(h.context.mailbox_map.entries()) == []


def test_a_source_whose_deleted_flag_another_session_keeps_clearing_is_not_moved_and_said_so():
    """Probe r3 (stop 50): a STORE that took the MOVE's \\Deleted away again (a client's flag resync) was read
    as "no right to set it": copy taken back, ``OK No messages moved (they were gone)`` with the message still
    in the source. It is flagged again, MARK_TRIES times; then nothing moves: the flag is cleared, the
    decision journaled, the copy taken back, and the client told NO [INUSE]."""
    h, src = _selected(1)
    dst = _copied_of_one(h, src)
    src.dataReceived(b"* 1 FETCH (UID 4 FLAGS ())\r\nrp6 OK\r\n")
    for tag in (7, 8, 9):
        assert _take(src) == b"rp%d UID STORE 4 +FLAGS (\\Deleted)\r\n" % tag
        src.dataReceived(b"* 1 FETCH (UID 4 FLAGS (\\Seen))\r\nrp%d OK\r\n" % tag)  # cleared by the other
    assert _take(src) == b"rp10 UID STORE 4 -FLAGS.SILENT (\\Deleted)\r\n"  # not \\Deleted before the MOVE
    src.dataReceived(b"rp10 OK\r\n")
    assert _take(src) == b"rp11 UID SEARCH UID 4\r\n"  # still there: its copy goes back
    src.dataReceived(b"* SEARCH 4\r\nrp11 OK\r\n")
    (entry,) = now(h.context.mailbox_map.entries())  # decided before any copy goes: nothing to expunge
    assert entry.step.value == "move-expunging" and (entry.data["present"], entry.data["vanished_dst"]) == ("", "5")
    _copy_taken_back(dst)
    assert h.to_client().endswith(b"m NO [INUSE] Another session kept clearing the messages' \\Deleted flag while "
                                  b"they were moved; those still in the mailbox were not moved (try again)\r\n")
    assert _take(src) == b""
    assert now(h.context.mailbox_map.entries()) == []


def test_a_source_expunged_on_the_moves_flag_keeps_its_copy_when_the_others_are_not_moved():
    """Probe s2 (stop 50): 7 taken by another session's EXPUNGE on the flag this MOVE set (moved: its copy is
    the message now), 8's flag kept being cleared (not moved): every copy was taken back, 7 in neither mailbox."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 7:8 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 EXPUNGE\r\n* 1 FETCH (UID 8 FLAGS ($Work))\r\nrp7 OK\r\n")
    assert _take(src) == b"rp8 UID FETCH 7 (UID FLAGS)\r\n"  # not named by the STORE: gone since (moved)
    src.dataReceived(b"rp8 OK\r\n")
    assert _take(src) == b"rp9 UID FETCH 7:8 (UID FLAGS)\r\n"  # an EXPUNGE was said: which are still there
    src.dataReceived(b"* 1 FETCH (UID 8 FLAGS ($Work))\r\nrp9 OK\r\n")
    for tag in (10, 11):
        assert _take(src) == b"rp%d UID STORE 8 +FLAGS (\\Deleted)\r\n" % tag
        src.dataReceived(b"* 1 FETCH (UID 8 FLAGS ($Work))\r\nrp%d OK\r\n" % tag)
    assert _take(src) == b"rp12 UID STORE 7 -FLAGS.SILENT (\\Deleted)\r\n"  # 8 was \\Deleted before the MOVE
    src.dataReceived(b"rp12 OK\r\n")
    assert _take(src) == b"rp13 UID SEARCH UID 7:8\r\n"
    src.dataReceived(b"* SEARCH 8\r\nrp13 OK\r\n")
    (entry,) = now(h.context.mailbox_map.entries())
    assert (entry.data["present"], entry.data["vanished_dst"]) == ("", "6")  # 5 (7's copy) stays
    _copy_taken_back(dst, b"6")
    out = h.to_client()
    assert out.startswith(b"* 3 EXISTS\r\n* 1 EXPUNGE\r\n") and out.endswith(b"still in the mailbox were not moved (try again)\r\n"), out
    assert now(h.context.mailbox_map.entries()) == []


def test_a_source_another_session_expunges_right_after_the_moves_flag_is_moved_not_taken_back():
    """Probe F (this stop): another session's plain EXPUNGE in a loop (a client that expunges on delete) took
    the message in the instant after the MOVE's STORE flagged it \\Deleted, before Dovecot named it in the
    STORE's answer; the MOVE took it for one someone else had moved away and took its copy back: in neither
    mailbox (3 of 40 lost). There right before the STORE, gone after it: it is moved, its copy kept."""
    h, src = _selected(1)
    dst = _copied_of_one(h, src)
    src.dataReceived(b"* 1 FETCH (UID 4 FLAGS ())\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 4 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 EXPUNGE\r\nrp7 OK\r\n")  # the other session's EXPUNGE, of our flag
    assert _take(src) == b"rp8 UID FETCH 4 (UID FLAGS)\r\n"
    src.dataReceived(b"rp8 OK\r\n")
    assert _take(src) == b"rp9 UID FETCH 4 (UID FLAGS)\r\n"  # an EXPUNGE was said: which are still there
    src.dataReceived(b"rp9 OK\r\n")
    assert _take(src) == b"rp10 UID FETCH 4 (UID FLAGS)\r\nrp11 UID STORE 4 +FLAGS.SILENT (\\Deleted)\r\nrp12 UID EXPUNGE 4\r\n"
    src.dataReceived(b"rp10 OK\r\nrp11 OK\r\nrp12 OK\r\n")
    assert _take(src) == b"rp13 UID SEARCH UID 4\r\n"
    src.dataReceived(b"* SEARCH\r\nrp13 OK\r\n")
    assert b"EXPUNGE" not in _take(dst)  # the copy stays: it is the message now
    assert h.to_client().endswith(b"* 1 EXPUNGE\r\n* OK [COPYUID 9 4 5] Moved\r\nm OK Move completed.\r\n")
    assert now(h.context.mailbox_map.entries()) == []


def test_a_source_message_dovecot_kept_after_its_uid_expunge_ok_stays_and_its_copy_goes_back():
    """Soak C seed 76065: Dovecot answered the MOVE's ``UID EXPUNGE 52`` OK and kept UID 52 (\\Deleted,
    2 s later still there; cause in Dovecot not found): the client told OK, the message twice. The
    MOVE now looks: one still there is flagged and expunged again (another session may have cleared its
    \\Deleted: probe r3, stop 50), transfer.MARK_TRIES times in all; then it stays, its copy taken back
    (before: left to recovery, never finished without master users), and the client is told NO."""
    h, src = _selected(1)
    dst = _copied_of_one(h, src)
    src.dataReceived(b"* 1 FETCH (UID 4 FLAGS ())\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 4 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 4 FLAGS (\\Deleted))\r\nrp7 OK\r\n")
    for tag in (9, 12, 15):  # (the first write reads the flags too)
        fetch = b"rp8 UID FETCH 4 (UID FLAGS)\r\n" if tag == 9 else b""
        assert _take(src) == fetch + b"rp%d UID STORE 4 +FLAGS.SILENT (\\Deleted)\r\nrp%d UID EXPUNGE 4\r\n" % (tag, tag + 1)
        if fetch:
            src.dataReceived(b"* 1 FETCH (UID 4 FLAGS (\\Deleted))\r\nrp8 OK\r\n")
        src.dataReceived(b"rp%d OK\r\nrp%d OK Expunge completed.\r\n" % (tag, tag + 1))  # and no EXPUNGE: 4 is there
        assert _take(src) == b"rp%d UID SEARCH UID 4\r\n" % (tag + 2)
        src.dataReceived(b"* SEARCH 4\r\nrp%d OK\r\n" % (tag + 2))
    assert _take(src) == b"rp18 UID STORE 4 -FLAGS.SILENT (\\Deleted)\r\n"  # not \\Deleted before the MOVE
    src.dataReceived(b"rp18 OK\r\n")
    assert _take(src) == b"rp19 UID SEARCH UID 4\r\n"
    src.dataReceived(b"* SEARCH 4\r\nrp19 OK\r\n")
    _copy_taken_back(dst)
    out = h.to_client()
    assert b"COPYUID" not in out, out  # nothing moved
    assert out.endswith(b"m NO [INUSE] UID EXPUNGE on b1 answered OK, yet 4 still there; those still in the source "
                        b"were not moved\r\n"), out
    assert now(h.context.mailbox_map.entries()) == []


def _copy_taken_back(dst, uids: bytes = b"5") -> None:
    """The destination (copies *uids* in Shared/X) selected and the copies expunged (mailops.expunge_uids: and looked for)."""
    assert _take(dst).endswith(b"rp6 SELECT Shared/X\r\n")
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp6 OK [READ-WRITE] Selected\r\n")
    assert _take(dst) == b"rp7 UID STORE %s +FLAGS.SILENT (\\Deleted)\r\nrp8 UID EXPUNGE %s\r\n" % (uids, uids)
    dst.dataReceived(b"rp7 OK\r\n* 1 EXPUNGE\r\nrp8 OK\r\n")
    assert _take(dst) == b"rp9 UID SEARCH UID %s\r\n" % uids
    dst.dataReceived(b"* SEARCH\r\nrp9 OK\r\n")


def _across_of_one(h, src, command: bytes, size: int = 3) -> object:
    """*command* (``m UID MOVE 4 Shared/X``, ``c UID COPY ...``) answered up to the message's FLAGS,
    INTERNALDATE and size (RFC822.SIZE *size*); the destination (the transfer's own connection)."""
    h.send(command + b"\r\n")
    assert _take(src) == b"rp2 UID SEARCH UID 4\r\n"
    src.dataReceived(b"* SEARCH 4\r\nrp2 OK\r\n")
    dst = h.backend
    _take(dst)
    dst.dataReceived(b'* LIST () "/" Shared/X\r\nrp1 OK\r\n')
    src.dataReceived(b'* 1 FETCH (UID 4 FLAGS () INTERNALDATE "01-Jan-2020 10:00:00 +0000" RFC822.SIZE %d)\r\n'
                     b"rp3 OK\r\n" % size)
    return dst


def _copied_of_one(h, src) -> object:
    """``UID MOVE 4 Shared/X`` answered up to its copy's verification; the source is asked next which of its
    UIDs are there (before its STORE); the destination."""
    dst = _uid_move_of_one(h, src)
    dst.dataReceived(b"rp3 OK [APPENDUID 9 5] Append completed.\r\n")
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp4 OK [READ-ONLY] Examined\r\n")
    dst.dataReceived(b"* 5 FETCH (UID 5 BODY[] {3}\r\nabc)\r\nrp5 OK\r\n")
    assert _take(src).endswith(b"rp6 UID FETCH 4 (UID FLAGS)\r\n")
    return dst


def _uid_move_of_one(h, src) -> object:
    """``UID MOVE 4 Shared/X`` answered up to the body FETCH (journaled at MOVE_APPENDING); the destination."""
    dst = _across_of_one(h, src, b"m UID MOVE 4 Shared/X")
    src.dataReceived(b"* STATUS INBOX (UIDVALIDITY 3 UIDNEXT 9 MESSAGES 2)\r\nrp4 OK\r\n")
    dst.dataReceived(b"* STATUS Shared/X (UIDVALIDITY 9 UIDNEXT 5 MESSAGES 4)\r\nrp2 OK\r\n")
    assert _take(src).endswith(b"rp5 UID FETCH 4 (UID BODY.PEEK[])\r\n")
    src.dataReceived(b"* 1 FETCH (UID 4 BODY[] {3}\r\nabc)\r\nrp5 OK\r\n")
    return dst


@pytest.mark.parametrize("read_back", [b"* 5 FETCH (UID 5 BODY[] {3}\r\nabd)\r\nrp5 OK\r\n",  # not what was sent
                                       b"* 1 EXPUNGE\r\nrp5 OK\r\n"])  # another session expunged it (probe 6, stop 48)
def test_a_copy_that_reads_back_differently_is_not_removed_from_the_source(read_back):
    h, src = _selected(1)
    dst = _uid_move_of_one(h, src)
    dst.dataReceived(b"rp3 OK [APPENDUID 9 5] Append completed.\r\n")
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp4 OK [READ-ONLY] Examined\r\n")
    _take(src)
    dst.dataReceived(read_back)
    answer = h.to_client()
    assert answer.startswith(b"m NO The messages were copied") and b"changed or removed" in answer, answer
    assert _take(src) == b""  # no STORE, no EXPUNGE on the source
    (entry,) = now(h.context.mailbox_map.entries())
    assert entry.step.value == "move-appending" and entry.owner is None  # recovery decides, by content


def test_a_destination_lost_before_the_copies_are_checked_is_said_and_left_to_recovery():
    """Committed (APPENDUID), then the destination goes during the check: the source is not touched, the
    entry is recovery's, and the NO says why (hostile probe 5: a bare "temporarily unavailable") and what
    may be."""
    h, src = _selected(1)
    dst = _uid_move_of_one(h, src)
    dst.dataReceived(b"rp3 OK [APPENDUID 9 5] Append completed.\r\n")
    _take(src)
    dst.connectionLost(Failure(ConnectionError("destination gone")))  # its EXAMINE unanswered
    answer = h.to_client()
    # (no master users here: recovery cannot take the copies back, so the NO promises nothing; with them:
    # test_move_told_no.py)
    assert answer == (b"m NO [UNAVAILABLE] The connection to b2 ended before the copies were checked: they may have "
                      b"been copied all the same; the source is kept\r\n"), answer
    assert _take(src) == b""  # no STORE, no EXPUNGE on the source
    (entry,) = now(h.context.mailbox_map.entries())
    assert entry.step.value == "move-appending" and entry.owner is None and entry.data["dst_uids"] == "5"


def test_destination_refusal_aborts_its_connection_and_touches_no_source_message():
    h, src = _selected(1)
    dst = _uid_move_of_one(h, src)
    dst.dataReceived(b"rp3 NO [OVERQUOTA] Quota exceeded\r\n")
    assert h.to_client() == b"m NO [OVERQUOTA] Quota exceeded\r\n"
    assert _take(src) == b""  # no STORE, no EXPUNGE on the source
    assert dst.transport.disconnecting
    assert now(h.context.mailbox_map.entries()) == []  # refused: nothing was saved, nothing to recover


def test_no_referral_to_the_proxy_itself():
    config = _config()
    assert referable(config, config.backends["b2"])
    assert not referable(config, config.backends["self"])
    h = SessionHarness(config)
    h.login()
    h.send(b'r RLIST "" ""\r\n')  # now referral-aware
    h.to_backend()
    h.from_backend(b'* LIST (\\Noselect) "/" ""\r\nrp1 OK\r\n')
    h.to_client()
    h.send(b"a SELECT Shared/X\r\n")
    assert h.to_client() == b"a NO [REFERRAL imap://alice;AUTH=*@127.0.0.3:1/Shared/X] Remote mailbox\r\n"
    h.send(b"b SELECT Loop/X\r\n")  # "self" is the proxy's own listener: proxied, never referred
    assert h.to_client() == b""
    assert h.backend.transport.value() == b"rp1 SELECT Loop/X\r\n"


def test_destination_lost_while_it_holds_the_source_paused_does_not_hang_the_client():
    h, src = _selected(1)
    h.send(b"c COPY 1 Shared/X\r\n")
    src.dataReceived(b"* SEARCH 4\r\nrp2 OK\r\n")
    dst = h.backend
    dst.dataReceived(b'* LIST () "/" Shared/X\r\nrp1 OK\r\n')
    src.dataReceived(b'* 1 FETCH (UID 4 FLAGS () INTERNALDATE "01-Jan-2020 10:00:00 +0000" RFC822.SIZE 3)\r\nrp3 OK\r\n')
    # The destination's socket is full: it pauses the source ...
    dst.transport.producer.pauseProducing()
    assert src.transport.producerState == "paused"
    # ... and dies. Twisted tells the producer of a lost connection to stop.
    dst.transport.producer.stopProducing()
    dst.connectionLost(Failure(ConnectionError("destination gone")))
    assert src.transport.producerState == "producing"  # else the FETCH never ends: a hung client
    src.dataReceived(b"* 1 FETCH (UID 4 BODY[] {3}\r\nabc)\r\nrp4 OK\r\n")
    assert h.to_client().startswith(b"c NO ")
    h.send(b"n NOOP\r\n")
    assert src.transport.value().endswith(b" NOOP\r\n")


def test_a_lost_backend_releases_the_back_pressure_it_put_on_the_client():
    h = SessionHarness(_config())
    h.login()
    producer = h.backend.transport.producer  # what the backend's transport pauses the client with
    producer.pauseProducing()
    assert h.client.producerState == "paused"
    producer.stopProducing()  # the backend's connection is lost
    assert h.client.producerState == "producing"


def test_destination_lost_before_the_append_starts_gets_an_answer():
    h, src = _selected(1)
    h.send(b"c COPY 1 Shared/X\r\n")
    src.dataReceived(b"* SEARCH 4\r\nrp2 OK\r\n")
    dst = h.backend
    dst.dataReceived(b'* LIST () "/" Shared/X\r\nrp1 OK\r\n')
    dst.connectionLost(Failure(ConnectionError("destination gone")))  # before any APPEND
    src.dataReceived(b'* 1 FETCH (UID 4 FLAGS () INTERNALDATE "01-Jan-2020 10:00:00 +0000" RFC822.SIZE 3)\r\nrp3 OK\r\n')
    assert h.to_client() == b"c NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"
    h.send(b"n NOOP\r\n")
    assert src.transport.value().endswith(b" NOOP\r\n")


def test_a_copy_whose_entry_was_released_meanwhile_commits_nothing():
    """A COPY across whose process stalled past its lease: another proxy's recovery released its entry (and
    a MOVE of the same messages may have run since, and been recovered by content: hostile probe 1 lost a
    copy that way). Before the MULTIAPPEND's last byte the entry is checked, as a MOVE's batch is: nothing is
    committed, the client is told."""
    h, src = _selected(1)
    dst = _across_of_one(h, src, b"c UID COPY 4 Shared/X")
    (entry,) = now(h.context.mailbox_map.entries())
    assert entry.op == "copy-messages"
    now(h.context.mailbox_map._store.end_move(entry.id))  # released by another process
    assert _take(src).endswith(b"UID FETCH 4 (UID BODY.PEEK[])\r\n")
    src.dataReceived(b"* 1 FETCH (UID 4 BODY[] {3}\r\nabc)\r\nrp4 OK\r\n")
    sent = _take(dst)
    assert b"abc" in sent and not sent.endswith(b"abc\r\n"), sent  # the command's last CRLF never sent
    answer = h.to_client()
    assert answer.startswith(b"c NO "), answer


def test_a_backend_without_master_user_is_warned_of_at_start(proxy_factory):
    """Without it, a move across cut off there is never recovered and its mailboxes stay held (NO [INUSE]
    from then on, probe 6 of stop 48): the operator is told at start, once per backend."""
    import time

    from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

    proxy = proxy_factory({"backends": {"b1": {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD}}})
    deadline = time.monotonic() + 30
    while "listening on" not in proxy.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    warned = re.findall(r"backend (\w+) has no master_user", proxy.stderr_text())
    assert sorted(warned) == ["b2", "b3"], proxy.stderr_text()[-2000:]


def test_a_deleted_flag_a_client_cleared_on_a_source_during_the_move_is_cleared_on_its_copy():
    """Stop 51's note: UID 8 was copied \\Deleted; a client un-deleted it while the MOVE ran, and the MOVE's own
    STORE set the flag again. The copy kept \\Deleted, for the next EXPUNGE there to take: the client's
    un-delete lost. A source without \\Deleted right before the MOVE's STORE is carried as it was then."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n* 2 FETCH (UID 8 FLAGS ($Work))\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 7:8 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\n"
                     b"rp7 OK\r\n")
    assert _take(dst) == b"rp6 SELECT Shared/X\r\n"  # the changes go to the copies, before the sources leave
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp6 OK [READ-WRITE] Selected\r\n")
    assert _take(dst) == b"rp7 UID STORE 6 -FLAGS.SILENT (\\Deleted)\r\n"
    dst.dataReceived(b"rp7 OK\r\n")
    _expunge_write(src, 8, _BOTH_DELETED, b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nrp%d OK\r\n")
    assert _take(src) == b"rp11 UID SEARCH UID 7:8\r\n"
    src.dataReceived(b"* SEARCH\r\nrp11 OK\r\n")
    assert h.to_client().endswith(b"m OK Move completed.\r\n")
    assert now(h.context.mailbox_map.entries()) == []


def test_a_flag_another_session_changed_on_a_deleted_source_during_the_move_keeps_the_copys_deleted():
    """Probe w4 (stop 52), on 364cfb8: Dovecot's answer to the MOVE's STORE names too a message whose flags
    another session changed ($K added to 8, \\Deleted since before the MOVE); taken for one the STORE
    changed, its copy lost \\Deleted: a message the user deleted came back (3-5 rounds of 6)."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work $K))\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 7:8 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work $K))\r\n"
                     b"rp7 OK\r\n")
    assert _take(dst) == b"rp6 SELECT Shared/X\r\n"
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp6 OK [READ-WRITE] Selected\r\n")
    assert _take(dst) == b"rp7 UID STORE 6 +FLAGS.SILENT ($K)\r\n"  # the keyword reaches the copy; \\Deleted stays
    dst.dataReceived(b"rp7 OK\r\n")
    assert _take(dst) == b""


def test_a_flag_another_session_changes_after_the_moves_mark_reaches_the_copy():
    """Probe a3 (stop 54): a STORE of another session answered between the MOVE's mark and its UID EXPUNGE
    (40-150 ms: the journal step, the first carry) went with the source (11-38 of 150 moved messages). The
    flags are read again in the expunge's own write; what changed since the first carry reaches the copies."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 7:8 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\nrp7 OK\r\n")
    assert _take(src) == b"rp8 UID FETCH 8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\nrp8 OK\r\n")
    assert _take(dst) == b""  # nothing changed so far
    # another session flagged 7 and took $Work from 8 since the mark
    _expunge_write(src, 9, b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Flagged \\Deleted))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted))\r\n",
                   b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nrp%d OK\r\n")
    assert _take(src) == b"rp12 UID SEARCH UID 7:8\r\n"
    src.dataReceived(b"* SEARCH\r\nrp12 OK\r\n")
    assert _take(dst) == b"rp6 SELECT Shared/X\r\n"
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp6 OK [READ-WRITE] Selected\r\n")
    assert _take(dst) == b"rp7 UID STORE 5 +FLAGS.SILENT (\\Flagged)\r\n"
    dst.dataReceived(b"rp7 OK\r\n")
    assert _take(dst) == b"rp8 UID STORE 6 -FLAGS.SILENT ($Work)\r\n"
    dst.dataReceived(b"rp8 OK\r\n")
    out = h.to_client()
    assert out.endswith(b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nm OK Move completed.\r\n") and b"FETCH" not in out, out
    assert now(h.context.mailbox_map.entries()) == []


@pytest.mark.parametrize("told", [b"* 2 EXPUNGE\r\n", b"* VANISHED 8\r\n"])  # (VANISHED: QRESYNC enabled)
def test_a_source_another_session_expunged_before_the_mark_is_not_moved_though_dovecot_still_fetched_it(told):
    """Probe b2 of stop 54: a session not yet told of another's EXPUNGE still gets FETCH data for the message,
    then the EXPUNGE. Taken for there, then gone after the MOVE's STORE ("taken by an EXPUNGE of our mark"), it
    counted as moved and its copy stayed: 30 of 30 messages a user expunged came back at the destination."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\n"
                     + told + b"rp6 OK\r\n")
    assert _take(src) == b"rp7 UID FETCH 7:8 (UID FLAGS)\r\n"  # asked again, now told
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\nrp7 OK\r\n")
    assert _take(src) == b"rp8 UID STORE 7 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\nrp8 OK\r\n")
    assert _take(src) == b"rp9 UID FETCH 7 (UID FLAGS)\r\nrp10 UID STORE 7 +FLAGS.SILENT (\\Deleted)\r\nrp11 UID EXPUNGE 7\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\nrp9 OK\r\nrp10 OK\r\n* 1 EXPUNGE\r\nrp11 OK\r\n")
    assert _take(src) == b"rp12 UID SEARCH UID 7\r\n"
    src.dataReceived(b"* SEARCH\r\nrp12 OK\r\n")
    _copy_taken_back(dst, b"6")  # 8's copy: the user expunged 8
    out = h.to_client()
    assert out.endswith(told + b"* OK [COPYUID 9 7 5] Moved\r\n* 1 EXPUNGE\r\nm OK Move completed.\r\n"), out
    assert now(h.context.mailbox_map.entries()) == []


def test_a_deleted_flag_another_session_set_during_the_move_reaches_the_copy():
    """Probe b2 of stop 54: the client's \\Deleted, set after the copy and before the MOVE's mark, was taken for
    the MOVE's own and not carried: a message the user deleted arrived undeleted (Dovecot's MOVE keeps it)."""
    h, src = _selected(2)
    dst = _two_copied(h, src)
    assert _take(src) == b"rp6 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen \\Deleted))\r\n* 2 FETCH (UID 8 FLAGS (\\Deleted $Work))\r\nrp6 OK\r\n")
    assert _take(src) == b"rp7 UID STORE 7:8 +FLAGS (\\Deleted)\r\n"
    src.dataReceived(b"rp7 OK\r\n")  # both \Deleted already: not named
    assert _take(src) == b"rp8 UID FETCH 7:8 (UID FLAGS)\r\n"
    src.dataReceived(_BOTH_DELETED + b"rp8 OK\r\n")
    assert _take(dst) == b"rp6 SELECT Shared/X\r\n"
    dst.dataReceived(b"* OK [UIDVALIDITY 9] UIDs valid\r\nrp6 OK [READ-WRITE] Selected\r\n")
    assert _take(dst) == b"rp7 UID STORE 5 +FLAGS.SILENT (\\Deleted)\r\n"
    dst.dataReceived(b"rp7 OK\r\n")
    _expunge_write(src, 9, _BOTH_DELETED, b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nrp%d OK\r\n")
    assert _take(src) == b"rp12 UID SEARCH UID 7:8\r\n"
    src.dataReceived(b"* SEARCH\r\nrp12 OK\r\n")
    assert h.to_client().endswith(b"m OK Move completed.\r\n")
    assert now(h.context.mailbox_map.entries()) == []


@pytest.mark.parametrize("still_there", [False, True])
def test_a_destination_deleted_during_the_move_is_trycreate(still_there):
    """Another session DELETEs the destination while the MULTIAPPEND is sent: Dovecot refuses it ``NO
    [SERVERBUG] Internal error occurred`` (probe m1 of stop 61, 3 of 9 rounds), which the client was told.
    Asked on the same connection and found gone, the answer is Dovecot's own MOVE's into a missing mailbox;
    still there, the backend's refusal stands. Nothing moved either way."""
    h, src = _selected(1)
    dst = _uid_move_of_one(h, src)
    _take(dst)
    dst.dataReceived(b"rp3 NO [SERVERBUG] Internal error occurred. Refer to server log for more information.\r\n")
    assert _take(dst) == b'rp4 LIST "" Shared/X\r\n'
    dst.dataReceived((b'* LIST () "/" Shared/X\r\n' if still_there else b"") + b"rp4 OK List completed.\r\n")
    assert h.to_client() == (b"m NO [SERVERBUG] Internal error occurred. Refer to server log for more information.\r\n"
                             if still_there else b"m NO [TRYCREATE] Mailbox doesn't exist\r\n")
    assert _take(src) == b""  # no STORE, no EXPUNGE on the source
    assert now(h.context.mailbox_map.entries()) == []
