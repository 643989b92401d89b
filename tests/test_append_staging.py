"""APPEND against scripted backends (exact bytes): MULTIAPPEND made atomic through a staging
mailbox for a backend without it, and a backend that answers early never left with half a
command (issue 15). The real-Dovecot side is tests/test_multiappend_rfc.py."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from referral_proxy import staging
from referral_proxy.imap.command import ParseError
from referral_proxy.imap.quota import quota_resources, room_left
from referral_proxy.imap.response import parse_response_start
from referral_proxy.imap.uidset import uid_set
from referral_proxy.journal import Reservation, Step
from referral_proxy.staging import appenduid_from_copyuid, is_staging_name, new_staging_name
from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, SessionHarness

NO_MULTIAPPEND = [c for c in DOVECOT_CAPS if c != "MULTIAPPEND"]
STAGE = b"referral-proxy-staging-0123"


@pytest.fixture(autouse=True)
def fixed_staging_name(monkeypatch):
    monkeypatch.setattr(staging, "new_staging_name", lambda: STAGE)


def _staging_harness(caps=NO_MULTIAPPEND) -> SessionHarness:
    h = SessionHarness(connector=FakeConnector(capabilities=caps))
    h.login()
    return h


def _prepared(h: SessionHarness) -> None:
    assert h.to_backend() == b"rp1 STATUS Box (UIDVALIDITY)\r\nrp2 CREATE " + STAGE + b"\r\n"
    h.from_backend(b"* STATUS Box (UIDVALIDITY 7)\r\nrp1 OK status\r\nrp2 OK created\r\n")


def test_uid_set_and_names():
    assert uid_set([5, 6, 7, 9, 3, 4]) == b"5:7,9,3:4"
    real = new_staging_name()
    assert is_staging_name(real) and is_staging_name(real.upper()) and len(real) == len(b"referral-proxy-staging-") + 32
    assert real != new_staging_name()
    copyuid = parse_response_start(b"rp4 OK [COPYUID 7 1:2 10:11] done")
    assert appenduid_from_copyuid(copyuid) == b"APPENDUID 7 10:11"


def test_messages_are_staged_then_moved_in_one_command():
    h = _staging_harness()
    h.send(b"a APPEND Box (\\Seen) {3+}\r\nabc (\\Flagged) {2+}\r\nde\r\n")
    _prepared(h)  # nothing of the messages goes before the target is known and the staging mailbox made
    assert h.to_backend() == (b"rp3 APPEND " + STAGE + b" (\\Seen) {3+}\r\nabc\r\n"
                              b"rp4 APPEND " + STAGE + b" (\\Flagged) {2+}\r\nde\r\n")
    h.from_backend(b"rp3 OK [APPENDUID 99 1] done\r\nrp4 OK [APPENDUID 99 2] done\r\n")
    # MOVE where the backend has it (the quota counts the messages once), COPY otherwise (below)
    assert h.to_backend() == (b"rp5 SELECT " + STAGE + b"\r\nrp6 MOVE 1:* Box\r\nrp7 UNSELECT\r\n")
    h.send(b"n NOOP\r\n")  # held until the APPEND is answered: the connection's selected state is ours
    assert h.to_client() == b""
    h.from_backend(b"* 2 EXISTS\r\n* OK [UIDVALIDITY 99] x\r\nrp5 OK [READ-WRITE] selected\r\n"
                   b"* OK [COPYUID 7 1:2 10:11] moving\r\n* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nrp6 OK moved\r\n"
                   b"rp7 OK unselected\r\n")
    assert h.to_client() == b"a OK [APPENDUID 7 10:11] Append completed.\r\n"  # nothing of the staging's shows
    # The NOOP waits for the staging mailbox to go: until then its journal entry holds Box
    # (a pipelined RENAME Box was refused INUSE: test_multiappend_pipelined.py).
    assert h.to_backend() == b"rp8 DELETE " + STAGE + b"\r\n"
    h.from_backend(b"rp8 OK deleted\r\n")
    assert h.to_backend() == b"rp9 NOOP\r\n"


def test_without_move_the_staged_messages_are_copied():
    h = _staging_harness([c for c in NO_MULTIAPPEND if c != "MOVE"])
    h.send(b"a APPEND Box (\\Seen) {3+}\r\nabc (\\Flagged) {2+}\r\nde\r\n")
    _prepared(h)
    h.to_backend()
    h.from_backend(b"rp3 OK [APPENDUID 99 1] done\r\nrp4 OK [APPENDUID 99 2] done\r\n")
    assert h.to_backend() == (b"rp5 EXAMINE " + STAGE + b"\r\nrp6 COPY 1:* Box\r\nrp7 UNSELECT\r\n")
    h.send(b"n NOOP\r\n")  # held until the APPEND is answered: the connection's selected state is ours
    assert h.to_client() == b""
    h.from_backend(b"* 2 EXISTS\r\n* OK [UIDVALIDITY 99] x\r\nrp5 OK [READ-ONLY] examined\r\n"
                   b"rp6 OK [COPYUID 7 1:2 10:11] copied\r\nrp7 OK unselected\r\n")
    assert h.to_client() == b"a OK [APPENDUID 7 10:11] Append completed.\r\n"  # nothing of the staging's shows
    assert h.to_backend() == b"rp8 DELETE " + STAGE + b"\r\n"
    h.from_backend(b"rp8 OK deleted\r\n")
    assert h.to_backend() == b"rp9 NOOP\r\n"
    h.from_backend(b"rp9 OK noop\r\n")
    assert h.to_client() == b"n OK noop\r\n"


def test_without_uidplus_the_answer_has_no_appenduid():
    h = _staging_harness([c for c in NO_MULTIAPPEND if c != "UIDPLUS"])
    h.send(b"a APPEND Box {1+}\r\nx {1+}\r\ny\r\n")
    _prepared(h)
    h.to_backend()
    h.from_backend(b"rp3 OK done\r\nrp4 OK done\r\n")
    assert h.to_backend().startswith(b"rp5 SELECT ")
    h.from_backend(b"rp5 OK selected\r\nrp6 OK moved\r\nrp7 OK unselected\r\n")
    assert h.to_client() == b"a OK Append completed.\r\n"


def test_a_missing_target_is_trycreate_before_the_literal():
    h = _staging_harness()
    h.send(b"a APPEND Box (\\Seen) {300}\r\n")
    assert h.to_backend() == b"rp1 STATUS Box (UIDVALIDITY)\r\nrp2 CREATE " + STAGE + b"\r\n"
    h.from_backend(b"rp1 NO [NONEXISTENT] Mailbox doesn't exist: Box\r\nrp2 OK created\r\n")
    assert h.to_client() == b"a NO [TRYCREATE] Mailbox doesn't exist: Box\r\n"  # no "+": the client sends nothing
    assert h.to_backend() == b"rp3 DELETE " + STAGE + b"\r\n"
    h.send(b"n NOOP\r\n")
    assert h.to_backend() == b""  # after the staging mailbox (its entry holds Box)
    h.from_backend(b"rp3 OK deleted\r\n")
    assert h.to_backend() == b"rp4 NOOP\r\n"


def test_without_a_staging_mailbox_one_message_goes_straight_and_a_second_cancels():
    h = _staging_harness()
    h.send(b"a APPEND Box {3+}\r\nabc")
    assert h.to_backend() == b"rp1 STATUS Box (UIDVALIDITY)\r\nrp2 CREATE " + STAGE + b"\r\n"
    h.from_backend(b"* STATUS Box (UIDVALIDITY 7)\r\nrp1 OK status\r\nrp2 NO [NOPERM] Not allowed here\r\n")
    assert h.to_backend() == b"rp3 APPEND Box {3+}\r\nabc"  # a single message is atomic by itself
    h.send(b" {2+}\r\nde\r\n")
    assert h.to_backend() == b" {0+}\r\n\r\n"  # a second one: the command is failed, nothing saved
    h.from_backend(b"rp3 BAD Invalid arguments\r\n")
    assert h.to_client() == (b"a NO [CANNOT] This mail server cannot append several messages in one command; "
                             b"nothing was appended\r\n")
    h.send(b"o APPEND Box {3+}\r\nxyz\r\n")  # the session knows now: straight, no second CREATE
    assert h.to_backend() == b"rp4 APPEND Box {3+}\r\nxyz\r\n"
    h.from_backend(b"rp4 OK [APPENDUID 7 1] done\r\n")
    assert h.to_client() == b"o OK [APPENDUID 7 1] done\r\n"


def test_a_refused_message_fails_the_whole_and_the_target_is_never_touched():
    h = _staging_harness()
    h.send(b"a APPEND Box {3+}\r\nabc {2+}\r\nde {1+}\r\nf\r\n")
    _prepared(h)
    h.to_backend()
    h.from_backend(b"rp3 OK [APPENDUID 99 1] done\r\nrp4 NO [OVERQUOTA] Quota exceeded\r\nrp5 OK [APPENDUID 99 2] x\r\n")
    assert h.to_client() == b"a NO [OVERQUOTA] Quota exceeded\r\n"
    assert h.to_backend() == b"rp6 DELETE " + STAGE + b"\r\n"  # no COPY ever


def _now(coro):
    """The result of a map-store coroutine that the memory store completes at once."""
    d = defer.ensureDeferred(coro)
    out: list = []
    d.addBoth(out.append)
    assert out, "the store did not answer at once"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _staging_entries(h: SessionHarness) -> list:
    return [e for e in _now(h.context.mailbox_map.entries()) if e.op == "staging"]


def _reservations(h: SessionHarness) -> list:
    return [(user, r) for _id, user, r in _now(h.context.mailbox_map.store.load()).reservations]


@pytest.mark.parametrize("deleted", [True, False])
def test_a_staging_mailbox_is_in_the_journal_from_before_its_create_until_it_is_deleted(deleted):
    h = _staging_harness()
    h.send(b"a APPEND Box {3+}\r\nabc {2+}\r\nde {1+}\r\nf\r\n")
    (entry,) = _staging_entries(h)  # written before the CREATE is sent
    assert entry.step is Step.STAGING and entry.owner is not None
    assert entry.data == {"backend": "b1", "mailbox": STAGE.decode(), "target": "Box"}
    assert _reservations(h) == [("alice", Reservation("Box", subtree=False, shared=True))]
    assert not h.context.mailbox_map.reserved("alice", "Box")  # shared: other APPENDs to Box go on
    _prepared(h)
    h.to_backend()
    h.from_backend(b"rp3 OK done\r\nrp4 NO [OVERQUOTA] Quota exceeded\r\nrp5 OK done\r\n")
    assert h.to_backend() == b"rp6 DELETE " + STAGE + b"\r\n"
    assert len(_staging_entries(h)) == 1
    h.from_backend(b"rp6 OK deleted\r\n" if deleted else b"rp6 NO [INUSE] Try again later\r\n")
    left = _staging_entries(h)
    if deleted:
        assert left == [] and _reservations(h) == []
    else:  # left to recovery: disowned, so the sweep of this very process takes it
        assert [(e.id, e.owner) for e in left] == [(entry.id, None)]


def test_a_create_answered_alreadyexists_is_taken_as_made_and_deleted_at_the_end():
    """Dovecot answers concurrent CREATEs with ALREADYEXISTS now and then, having made the
    mailbox (tests/test_multiappend_rfc.py saw it): the random name is ours, so it is used and
    deleted, never left behind, its journal entry kept until then."""
    h = _staging_harness()
    h.send(b"a APPEND Box {3+}\r\nabc {2+}\r\nde\r\n")
    assert h.to_backend() == b"rp1 STATUS Box (UIDVALIDITY)\r\nrp2 CREATE " + STAGE + b"\r\n"
    h.from_backend(b"* STATUS Box (UIDVALIDITY 7)\r\nrp1 OK status\r\nrp2 NO [ALREADYEXISTS] Mailbox already exists\r\n")
    assert h.to_backend() == (b"rp3 APPEND " + STAGE + b" {3+}\r\nabc\r\nrp4 APPEND " + STAGE + b" {2+}\r\nde\r\n")
    h.from_backend(b"rp3 OK done\r\nrp4 NO [OVERQUOTA] Quota\r\n")
    assert h.to_client() == b"a NO [OVERQUOTA] Quota\r\n"
    assert [e.data["mailbox"] for e in _staging_entries(h)] == [STAGE.decode()]
    assert h.to_backend() == b"rp5 DELETE " + STAGE + b"\r\n"
    h.from_backend(b"rp5 OK deleted\r\n")
    assert _staging_entries(h) == []


def test_a_target_a_move_holds_is_never_staged_into():
    h = _staging_harness()
    _now(h.context.mailbox_map.begin_move("alice", "move", [Reservation(None)], {}))  # a whole-user move begins
    h.send(b"a APPEND Box {3+}\r\nabc\r\n")
    assert h.to_client() == b""  # at its check: waited for a moment (holds.py), as any command
    for _ in range(100):
        h.reactor.advance(0.1)
    assert h.to_client().startswith(b"a NO [INUSE] ")
    assert h.to_backend() == b""  # no STATUS, no staging mailbox
    assert _staging_entries(h) == []


def test_a_refusal_while_a_later_literal_streams_lets_that_literal_through_then_stops():
    h = _staging_harness()
    h.send(b"a APPEND Box {3+}\r\nabc {9+}\r\nhalf")
    _prepared(h)
    assert h.to_backend() == b"rp3 APPEND " + STAGE + b" {3+}\r\nabc\r\nrp4 APPEND " + STAGE + b" {9+}\r\nhalf"
    h.from_backend(b"rp3 NO [OVERQUOTA] Quota exceeded\r\n")
    h.send(b"-rest {5+}\r\nnever\r\nn NOOP\r\n")
    # The rest of the streaming literal goes (the backend drains it), the next message does not.
    assert h.to_backend() == b"-rest\r\n"  # the NOOP waits for the answer and the staging mailbox to go
    h.from_backend(b"rp4 OK [APPENDUID 99 1] done\r\n")
    assert h.to_client() == b"a NO [OVERQUOTA] Quota exceeded\r\n"
    assert h.to_backend() == b"rp5 DELETE " + STAGE + b"\r\n"
    h.from_backend(b"rp5 OK deleted\r\n")
    assert h.to_backend() == b"rp6 NOOP\r\n"


def test_client_leaving_mid_literal_aborts_it_and_the_staging_mailbox_goes_over_a_new_connection():
    h = _staging_harness()
    conn = h.backend
    h.send(b"a APPEND Box {3+}\r\nabc {10+}\r\nhalf")
    _prepared(h)
    h.to_backend()
    h.session.connectionLost(Failure(ConnectionError("client gone")))
    assert conn.transport.disconnecting  # the half message is aborted by closing
    conn.connectionLost(Failure(ConnectionError("closed")))
    cleaner = h.backend
    assert cleaner is not conn
    assert cleaner.transport.value() == b"rp1 DELETE " + STAGE + b"\r\n"
    cleaner.dataReceived(b"rp1 OK deleted\r\n")
    assert cleaner.transport.disconnecting


def test_client_leaving_between_messages_deletes_the_staging_mailbox_on_its_connection():
    h = _staging_harness()
    conn = h.backend
    h.send(b"a APPEND Box {3+}\r\nabc")
    _prepared(h)
    h.to_backend()
    h.session.connectionLost(Failure(ConnectionError("client gone")))
    assert not conn.transport.disconnecting  # message 1's answer is still to come
    h.from_backend(b"rp3 OK [APPENDUID 99 1] done\r\n")
    assert h.to_backend() == b"rp4 DELETE " + STAGE + b"\r\n"  # never a COPY: the command was not complete
    h.from_backend(b"rp4 OK deleted\r\n")
    assert conn.transport.disconnecting


def test_commit_with_a_mailbox_selected_goes_over_a_new_connection_and_exists_follow():
    h = _staging_harness()
    session_conn = h.backend
    h.send(b"s SELECT Box\r\n")
    h.from_backend(b"* 1 EXISTS\r\n" + h.to_backend().split(b" ")[0] + b" OK [READ-WRITE] selected\r\n")
    h.to_client()
    h.send(b"a APPEND Box {1+}\r\nx {1+}\r\ny\r\n")
    assert h.to_backend() == b"rp2 STATUS Box (UIDVALIDITY)\r\nrp3 CREATE " + STAGE + b"\r\n"
    h.from_backend(b"* STATUS Box (UIDVALIDITY 7)\r\nrp2 OK status\r\nrp3 OK created\r\n")
    h.to_backend()
    h.from_backend(b"rp4 OK [APPENDUID 99 1] done\r\nrp5 OK [APPENDUID 99 2] done\r\n")
    committer = h.backend
    assert committer is not session_conn
    assert committer.transport.value() == b"rp1 SELECT " + STAGE + b"\r\nrp2 MOVE 1:* Box\r\nrp3 UNSELECT\r\n"
    committer.dataReceived(b"rp1 OK x\r\n* OK [COPYUID 7 1:2 2:3] moving\r\nrp2 OK moved\r\nrp3 OK x\r\n")
    # The session's own connection shows the copies before the answer, as a direct APPEND would.
    assert session_conn.transport.value() == b"rp6 NOOP\r\n"
    session_conn.transport.clear()
    session_conn.dataReceived(b"* 3 EXISTS\r\n* 3 RECENT\r\nrp6 OK noop\r\n")
    assert h.to_client() == b"* 3 EXISTS\r\n* 3 RECENT\r\na OK [APPENDUID 7 2:3] Append completed.\r\n"
    assert committer.transport.value().endswith(b"rp4 DELETE " + STAGE + b"\r\n")
    committer.dataReceived(b"rp4 OK deleted\r\n")
    assert committer.transport.disconnecting


def test_home_backend_lost_mid_staging_removes_the_staging_mailbox_elsewhere():
    h = _staging_harness()
    conn = h.backend
    h.send(b"a APPEND Box {3+}\r\nabc")
    _prepared(h)
    h.from_backend(b"rp3 OK [APPENDUID 99 1] done\r\n")
    conn.connectionLost(Failure(ConnectionError("gone")))
    assert h.to_client().endswith(b"* BYE Mail server connection lost\r\n")
    h.session.connectionLost(Failure(ConnectionError("closed after the BYE")))
    cleaner = h.backend
    assert cleaner is not conn and cleaner.transport.value() == b"rp1 DELETE " + STAGE + b"\r\n"


def test_staging_names_are_refused_and_hidden():
    h = _staging_harness()
    for command in (b"SELECT " + STAGE, b"CREATE Referral-Proxy-Staging-x", b"RENAME Box " + STAGE,
                    b"STATUS " + STAGE + b" (MESSAGES)", b"APPEND " + STAGE + b" {1}"):
        h.send(b"r " + command + b"\r\n")
        assert h.to_client() == b"r NO [CANNOT] Mailbox names beginning with referral-proxy-staging- or referral-proxy-aside- are reserved\r\n"
    assert h.to_backend() == b""
    h.send(b'l LIST "" "*"\r\n')
    sent = h.to_backend()
    assert sent.endswith(b'LIST "" "*"\r\n')
    tag = sent.split(b" ")[0]
    h.from_backend(b'* LIST (\\HasNoChildren) "/" INBOX\r\n* LIST (\\HasNoChildren) "/" ' + STAGE + b"\r\n"
                   + tag + b" OK listed\r\n")
    assert STAGE not in h.to_client()


# -- PASS: a backend that answers early is never left with half a command -------------------------


def test_an_early_answer_mid_literal_lets_the_literal_through_then_ends_the_command():
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND nosuch {9+}\r\nhalf")
    assert h.to_backend() == b"rp1 APPEND nosuch {9+}\r\nhalf"
    h.from_backend(b"rp1 NO [TRYCREATE] Mailbox doesn't exist: nosuch\r\n")
    assert h.to_client() == b""  # answered once the backend has the whole command
    h.send(b"-rest {3+}\r\nabc\r\nn NOOP\r\n")
    assert h.to_backend() == b"-rest\r\nrp2 NOOP\r\n"  # the literal's end, the CRLF ending the command
    assert h.to_client() == b"a NO [TRYCREATE] Mailbox doesn't exist: nosuch\r\n"


def test_an_early_answer_between_messages_ends_the_command_at_once():
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND INBOX {3+}\r\nabc")
    h.from_backend(b"rp1 NO [OVERQUOTA] Quota exceeded\r\n")
    assert h.to_backend() == b"rp1 APPEND INBOX {3+}\r\nabc\r\n"  # the backend's command ends at once
    assert h.to_client() == b"a NO [OVERQUOTA] Quota exceeded\r\n"
    h.send(b" {5}\r\n")  # what the client had on its way of the command is dropped, never "+"
    assert h.to_client() == b"" and h.to_backend() == b""
    h.send(b"n NOOP\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"


def test_a_small_sync_literal_is_announced_to_the_backend_once_it_has_answered():
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND INBOX {3}\r\n")
    h.from_backend(b"+ OK\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"abc")
    h.from_backend(b"rp1 NO [OVERQUOTA] Quota exceeded\r\n")  # the backend failed the command mid-way
    h.send(b" (\\Seen) {3}\r\n")
    assert h.to_client() == b"a NO [OVERQUOTA] Quota exceeded\r\n"  # and never a "+" for this literal
    h.send(b"n NOOP\r\n")
    assert h.to_backend() == b"rp1 APPEND INBOX {3}\r\nabc\r\nrp2 NOOP\r\n"


def test_quota_room_parsing():
    assert quota_resources([b'"" (STORAGE 10 512 MESSAGE 3 1000)'], []) == {"STORAGE": (10, 512), "MESSAGE": (3, 1000)}
    assert room_left([{"STORAGE": (10, 512)}, {"MESSAGE": (3, 5)}]) == ((512 - 10 - 1) * 1024, 2)
    assert room_left([]) == (None, None)
    with pytest.raises(ParseError):
        quota_resources([b'"" (STORAGE 10)'], [])


def test_large_sync_literals_that_fit_the_quota_are_taken_at_once():
    h = SessionHarness(connector=FakeConnector(capabilities=list(DOVECOT_CAPS) + ["QUOTA"]))
    h.login()
    h.send(b"a APPEND INBOX {3}\r\n")
    assert h.to_backend() == b"rp1 GETQUOTAROOT INBOX\r\nrp2 APPEND INBOX {3}\r\n"
    h.from_backend(b'* QUOTAROOT INBOX ""\r\n* QUOTA "" (STORAGE 10 100)\r\nrp1 OK quota\r\n+ OK\r\n')
    assert h.to_client() == b"+ Ready for literal data\r\n"  # the quota's answer is the proxy's own
    h.send(b"abc {50000}\r\n")  # 50 KB fit in the 89 KB left: "+" without asking the backend
    assert h.to_client() == b"+ Ready for literal data\r\n"
    assert h.to_backend() == b"abc"  # the next message's arguments go with its first bytes
    h.send(b"x" * 50000 + b" {50000}\r\n")  # the next 50 KB may not: the backend decides first
    assert h.to_client() == b""
    assert h.to_backend() == b" {50000+}\r\n" + b"x" * 50000 + b" {50000}\r\n"
    h.from_backend(b"rp2 NO [OVERQUOTA] Quota exceeded\r\n")
    assert h.to_client() == b"a NO [OVERQUOTA] Quota exceeded\r\n"


class _Deleter:
    """A backend connection that answers DELETE as told and records what it was sent."""

    name = "b1"

    def __init__(self, answer: bytes) -> None:
        self.answer, self.sent = answer, []

    async def command(self, text: bytes):
        from referral_proxy.backend import Tagged
        self.sent.append(text)
        return Tagged(parse_response_start(b"rp1 " + self.answer), b"rp1 " + self.answer)


@pytest.mark.parametrize("answer, outcome", [(b"OK deleted", "staging mailbox deleted"),
                                             (b"NO [NONEXISTENT] Mailbox doesn't exist", "no staging mailbox was left"),
                                             (b"NO [SERVERBUG] broken", None)])
def test_recovery_deletes_the_staging_mailbox_the_entry_names_and_only_that(answer, outcome):
    import asyncio

    from referral_proxy.backend import BackendError
    from referral_proxy.config import MapConfig
    from referral_proxy.recovery import describe
    from referral_proxy.routing import MailboxMap

    mailbox_map = MailboxMap(MapConfig(default="b1"))
    entry = _now(staging.MapJournal(mailbox_map).begin("Alice", "b1", STAGE, b"Caf\xe9"))
    assert describe(entry) == f"alice: APPEND to Caf\udce9 staged in {STAGE.decode()} on b1, at staging"
    conn = _Deleter(answer)
    if outcome is None:
        with pytest.raises(BackendError):
            asyncio.run(staging.drop_staging(mailbox_map, entry, conn))
        assert len(_now(mailbox_map.entries())) == 1  # left for the next try
    else:
        assert outcome in asyncio.run(staging.drop_staging(mailbox_map, entry, conn))
        assert _now(mailbox_map.entries()) == []
    assert conn.sent == [b"DELETE " + STAGE]
    entry.data["mailbox"] = "INBOX"  # a corrupted or hostile entry: nothing else is ever deleted
    other = _Deleter(b"OK deleted")
    with pytest.raises(BackendError):
        asyncio.run(staging.drop_staging(mailbox_map, entry, other))
    assert other.sent == []


def _quota_harness() -> SessionHarness:
    h = SessionHarness(connector=FakeConnector(capabilities=list(DOVECOT_CAPS) + ["QUOTA"]))
    h.login()
    return h


def _first_append(h: SessionHarness, box: bytes = b"INBOX", quota: bytes | None = b"STORAGE 10 100") -> None:
    """One sync APPEND of 3 bytes to *box*, announced to the backend and taken (the quota's
    resources known, or None: GETQUOTAROOT refused)."""
    h.send(b"a APPEND " + box + b" {3}\r\n")
    assert h.to_backend() == b"rp1 GETQUOTAROOT " + box + b"\r\nrp2 APPEND " + box + b" {3}\r\n"
    h.from_backend((b'* QUOTAROOT ' + box + b' ""\r\n* QUOTA "" (' + quota + b')\r\nrp1 OK quota\r\n'
                    if quota is not None else b"rp1 NO no quota\r\n") + b"+ OK\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"abc\r\n")
    assert h.to_backend() == b"abc\r\n"
    h.from_backend(b"rp2 OK [APPENDUID 7 1] done\r\n")
    assert h.to_client() == b"a OK [APPENDUID 7 1] done\r\n"


def test_the_next_sync_append_to_a_target_that_took_one_is_answered_by_the_proxy():
    """One APPEND per message (imaplib, offlineimap, doveadm import): the target took the
    last one and its quota's room is known, so "+" comes at once, the backend gets the message
    as LITERAL+ and no GETQUOTAROOT: one backend command and one round trip per message."""
    h = _quota_harness()
    _first_append(h)
    h.send(b"b APPEND INBOX (\\Seen) {50000}\r\n")  # 50 KB fit in the 89 KB the quota left
    assert h.to_client() == b"+ Ready for literal data\r\n"
    assert h.to_backend() == b""  # the command goes with the literal's first bytes: one send, one wake-up
    h.send(b"x" * 50000 + b"\r\n")
    assert h.to_backend() == b"rp3 APPEND INBOX (\\Seen) {50000+}\r\n" + b"x" * 50000 + b"\r\n"
    h.from_backend(b"rp3 OK [APPENDUID 7 2] done\r\n")
    assert h.to_client() == b"b OK [APPENDUID 7 2] done\r\n"
    h.send(b"c APPEND INBOX {50000}\r\n")  # the room left (~39 KB) may not take 50 KB: asked again
    assert h.to_client() == b""
    assert h.to_backend() == b"rp4 GETQUOTAROOT INBOX\r\nrp5 APPEND INBOX {50000}\r\n"
    h.from_backend(b'* QUOTAROOT INBOX ""\r\n* QUOTA "" (STORAGE 60 100)\r\nrp4 OK quota\r\n'
                   b"rp5 NO [OVERQUOTA] Quota exceeded\r\n")
    assert h.to_client() == b"c NO [OVERQUOTA] Quota exceeded\r\n"  # before the data, as before
    h.send(b"d APPEND INBOX {3}\r\n")  # refused last time: the backend decides first again
    assert h.to_client() == b""
    assert h.to_backend() == b"rp6 GETQUOTAROOT INBOX\r\nrp7 APPEND INBOX {3}\r\n"


@pytest.mark.parametrize("later", ["other mailbox", "10 s later", "no quota known"])
def test_an_unknown_or_stale_target_is_still_asked_before_the_data(later):
    h = _quota_harness()
    _first_append(h, quota=b"STORAGE 10 100" if later != "no quota known" else None)
    box = b"Other" if later == "other mailbox" else b"INBOX"
    if later == "10 s later":
        h.reactor.advance(10.5)
    h.send(b"b APPEND " + box + b" {5000}\r\n")
    assert h.to_client() == b""  # no "+" of the proxy's own
    assert h.to_backend() == b"rp3 GETQUOTAROOT " + box + b"\r\nrp4 APPEND " + box + b" {5000}\r\n"
    h.from_backend(b"rp3 OK quota\r\nrp4 NO [TRYCREATE] Mailbox doesn't exist\r\n")
    assert h.to_client() == b"b NO [TRYCREATE] Mailbox doesn't exist\r\n"


@pytest.mark.parametrize("sent", [b"", b"x" * 10])
def test_a_client_gone_after_the_proxys_plus_leaves_the_backend_no_half_command(sent):
    """The command to the backend goes with the literal's first bytes: a client that leaves
    before them left nothing on the backend; one that leaves mid-literal cut it off there
    (the backend connection closes: Dovecot saves nothing of an unfinished literal)."""
    h = _quota_harness()
    _first_append(h)
    backend = h.backend
    h.send(b"b APPEND INBOX {20}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(sent)
    h.session.connectionLost(None)
    h.turns()
    out = h.to_backend()
    assert (b"rp3 APPEND" in out) == bool(sent)
    if sent:
        assert out.startswith(b"rp3 APPEND INBOX {20+}\r\n" + sent)
        assert backend.transport.disconnecting  # cut off: never completed with bytes of ours


def test_a_target_gone_since_refuses_after_the_literal_and_nothing_of_it_runs():
    """The trade-off: the target was deleted after it took a message. The proxy said "+", the
    backend refuses the LITERAL+ command and drains the literal; the client gets the NO after
    its data (RFC 3501 allows it), and nothing of the body reaches the backend as a command."""
    h = _quota_harness()
    _first_append(h)
    h.send(b"b APPEND INBOX {20}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    assert h.to_backend() == b""  # sent with the literal's first bytes
    h.send(b"x LOGOUT\r\nx DEL")
    assert h.to_backend() == b"rp3 APPEND INBOX {20+}\r\nx LOGOUT\r\nx DEL"
    h.from_backend(b"rp3 NO [TRYCREATE] Mailbox doesn't exist\r\n")  # mid-literal: it drains the rest
    h.send(b"ETE\r\n\r\ny NOOP\r\n")
    assert h.to_backend() == b"ETE\r\n\r\n" + b"rp4 NOOP\r\n"
    assert h.to_client() == b"b NO [TRYCREATE] Mailbox doesn't exist\r\n"


def test_a_staged_utf8_message_keeps_its_wrapping():
    """RFC 6855's ``UTF8 (~{n}...)`` to a backend with UTF8=ACCEPT and no MULTIAPPEND: each staged
    APPEND carries its message's wrapping, the ")" before the staged command's CRLF."""
    h = _staging_harness([*NO_MULTIAPPEND, "UTF8=ACCEPT"])
    h.send(b"a APPEND Box UTF8 (~{4+}\r\nh\xc3\xa9!) (\\Seen) {2+}\r\nde\r\n")
    _prepared(h)
    assert h.to_backend() == (b"rp3 APPEND " + STAGE + b" UTF8 (~{4+}\r\nh\xc3\xa9!)\r\n"
                              b"rp4 APPEND " + STAGE + b" (\\Seen) {2+}\r\nde\r\n")
