"""Two sessions MOVE the same message within one backend at the same moment (the client's MOVE is
relayed: both mailboxes on b1). Dovecot 2.3.19 lets both succeed: the message ends in both
destinations (tests/dovecot_move_race.py, direct: 31 of 60 rounds). One after the other the second
finds it gone. The proxy relays a MOVE of a mailbox after another session's MOVE of that mailbox
completed (in one proxy process). Judged by a census of the backend, every message once."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, seed

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = 30


@pytest.mark.parametrize("command", [b"UID MOVE", b"MOVE"])
def test_two_sessions_moving_one_message_at_once_leave_it_once(proxy_factory, fleet, command):
    mail = [f"twice-{i}@t" for i in range(ROUNDS)]
    seed(fleet["b1"], "carol", "Work", mail)
    for box in ("A", "B"):
        seed(fleet["b1"], "carol", box, [])
    proxy = proxy_factory()
    sessions = [Wire(proxy.host, proxy.port, timeout=60) for _ in range(2)]
    for w in sessions:
        w.login("carol")
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    answers = []
    for i in range(ROUNDS):
        which = b"%d" % (i + 1) if command == b"UID MOVE" else b"1"  # the lowest left, by number
        for w, box in zip(sessions, (b"A", b"B")):
            w.send(b"m " + command + b" " + which + b" " + box + b"\r\n")
        answers.append([w.until_tagged(b"m")[-1] for w in sessions])
        for w in sessions:  # both hear of the expunge before the next round
            assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    for w in sessions:
        w.close()
    counts, where = census(fleet, "carol")
    assert {i: where[i] for i in mail if counts[i] != 1} == {}, answers


# -- scripted: the turn waits, is passed on, and ends when the backend goes ------------------------

from twisted.python.failure import Failure  # noqa: E402

from referral_proxy.testing.fakes import SessionHarness  # noqa: E402
from referral_proxy.turns import Turns  # noqa: E402

KEY = ("b1", "alice", "INBOX")


def _selected() -> SessionHarness:
    h = SessionHarness()
    h.login()
    h.send(b"s SELECT INBOX\r\n")
    assert h.to_backend() == b"rp1 SELECT INBOX\r\n"
    h.from_backend(b"* 2 EXISTS\r\nrp1 OK [READ-WRITE] done\r\n")
    h.to_client()
    return h


def test_a_move_waits_for_the_mailbox_s_turn_and_pipelined_commands_after_it():
    h = _selected()
    other = []
    h.context.move_turns.take(KEY).addCallback(other.append)  # another session's MOVE of INBOX under way
    h.send(b"m MOVE 1 Archive\r\nn NOOP\r\n")
    assert h.to_backend() == b""  # neither: the NOOP stays behind the MOVE, as the client sent them
    other[0]()
    h.turns()
    assert h.to_backend() == b"rp2 MOVE 1 Archive\r\nrp3 NOOP\r\n"
    assert h.context.move_turns.busy(KEY)  # until its completion
    h.from_backend(b"* 1 EXPUNGE\r\nrp2 OK Move completed\r\nrp3 OK done\r\n")
    assert h.to_client() == b"* 1 EXPUNGE\r\nm OK Move completed\r\nn OK done\r\n"
    assert not h.context.move_turns.busy(KEY)


def test_a_move_behind_a_fetch_takes_its_turn_once_the_fetch_is_answered():
    h = _selected()
    h.send(b"f FETCH 1 BODY.PEEK[]\r\nm UID MOVE 7 Archive\r\n")
    assert h.to_backend() == b"rp2 FETCH 1 BODY.PEEK[]\r\n"
    assert not h.context.move_turns.busy(KEY)  # main: taken, and the MOVE sent behind the FETCH
    h.from_backend(b"* 1 FETCH (BODY[] {1}\r\nx)\r\nrp2 OK done\r\n")
    h.turns()
    assert h.to_backend() == b"rp3 UID MOVE 7 Archive\r\n"
    assert h.context.move_turns.busy(KEY)


def test_a_move_takes_no_turn_while_the_client_does_not_read_what_it_was_sent():
    h = _selected()
    h.send(b"f FETCH 1 BODY.PEEK[]\r\nm UID MOVE 7 Archive\r\n")
    h.to_backend()
    output = h.session.flow.client_output
    output.pauseProducing()  # the FETCH's last bytes overfilled the client's buffer, its completion read with them
    h.from_backend(b"* 1 FETCH (BODY[] {1}\r\nx)\r\nrp2 OK done\r\n")
    h.turns()
    assert h.to_backend() == b"" and not h.context.move_turns.busy(KEY)  # its answer would stay unread
    output.resumeProducing()
    h.turns()
    assert h.to_backend() == b"rp3 UID MOVE 7 Archive\r\n"
    h.from_backend(b"rp3 OK Move completed\r\n")
    assert b"m OK Move completed" in h.to_client()
    assert not h.context.move_turns.busy(KEY)


def test_a_backend_gone_mid_move_ends_its_turn():
    h = _selected()
    h.send(b"m UID MOVE 7 Archive\r\n")
    assert h.to_backend() == b"rp2 UID MOVE 7 Archive\r\n"
    assert h.context.move_turns.busy(KEY)
    h.backend.connectionLost(Failure(ConnectionError("gone")))
    assert not h.context.move_turns.busy(KEY)  # another session's MOVE of INBOX is not held for good


def test_turns_come_in_order_and_pass_over_a_cancelled_waiter():
    turns = Turns()
    got: list = []
    first = turns.take("k")
    first.addCallback(got.append)
    gone = turns.take("k")
    gone.addErrback(lambda _f: None)
    third = turns.take("k")
    third.addCallback(got.append)
    gone.cancel()  # its session ended while it waited
    assert len(got) == 1
    got[0]()
    got[0]()  # a second call (completion and loss both) changes nothing
    assert len(got) == 2 and turns.busy("k")
    got[1]()
    assert not turns.busy("k")


def test_a_turn_ended_as_soon_as_it_is_given_leaves_the_key_free():
    """The next holder may end its turn inside the release that gives it (a session gone, a backend
    lost): the release that gave it must still finish cleanly (soak seed 18364: a rewrite over
    Twisted's DeferredLock raised KeyError there, inside a relayed MOVE's completion)."""
    turns = Turns()
    first = turns.take("k")
    release = first.result
    turns.take("k").addCallback(lambda end: end())  # ends its turn the moment it gets it
    release()
    assert not turns.busy("k")
    again = turns.take("k")
    assert again.called and turns.busy("k")
    again.result()
    assert not turns.busy("k")
