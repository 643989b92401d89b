"""A command waiting for a brief hold to end, when another process takes the name in the moment between.

The session asks, while it waits, whether anything still holds the name (holds.wait_free); free, it looks again
as it goes on (mailboxes.target). Another process's DELETE or RENAME of the same name could begin in between
(each look reads the map store anew): the command was then told `NO [INUSE] Mailbox is being moved to another
server`, though the new holder too was one that lets go within moments (one of nine DELETEs of a placed mailbox at
once, through two proxies of two workers, in one CI run). It waits for that holder as it did for the first.
"""

from __future__ import annotations

from twisted.internet import defer

from referral_proxy.journal import Reservation
from referral_proxy.testing.fakes import SessionHarness


def _begin(h: SessionHarness, name: str, op: str = "rename-local"):
    began = defer.ensureDeferred(h.context.mailbox_map.begin_move("alice", op, [Reservation(name, subtree=False)],
                                                                  {"mailbox": name}))
    assert began.called
    return began.result


def _end(h: SessionHarness, entry) -> None:
    assert defer.ensureDeferred(h.context.mailbox_map.end_move(entry)).called


def _delete_meeting_a_hold() -> tuple[SessionHarness, object]:
    """A session whose DELETE Box met another's RENAME of Box on one backend (brief: waited for)."""
    h = SessionHarness()
    h.login()
    first = _begin(h, "Box")
    h.send(b"d DELETE Box\r\n")
    assert h.to_client() == b"" and h.to_backend() == b""
    return h, first


def test_a_second_brief_holder_met_as_the_first_lets_go_is_waited_for_too():
    h, first = _delete_meeting_a_hold()
    mailbox_map = h.context.mailbox_map
    looks = mailbox_map.holders
    second = []

    def holders(user, wanted):
        found = looks(user, wanted)
        if not found and not second:  # another process begins right after this look
            second.append(_begin(h, "Box"))
        return found

    mailbox_map.holders = holders
    _end(h, first)
    h.reactor.advance(0.2)
    h.turns()
    assert second and h.to_client() == b""  # main: d NO [INUSE] Mailbox is being moved to another server
    assert h.to_backend() == b""
    _end(h, second[0])
    h.reactor.pump([0.2] * 5)
    h.turns()
    sent = h.to_backend()
    h.from_backend(b"rp1 OK Delete completed.\r\n")
    assert (sent, h.to_client()) == (b"rp1 DELETE Box\r\n", b"d OK Delete completed.\r\n")


def test_a_holder_that_stays_past_the_wait_is_still_refused():
    h, _first = _delete_meeting_a_hold()
    h.reactor.pump([0.1] * 40)
    h.turns()
    assert h.to_client().startswith(b"d NO [INUSE]") and h.to_backend() == b""
