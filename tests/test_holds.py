"""holds.py, scripted (a memory store, a fake clock): names held by an operation at its check are
waited for, a move under way is refused at once, and the wait is bounded."""

from __future__ import annotations

from twisted.internet import defer, task

from referral_proxy.config import MapConfig
from referral_proxy.holds import WAIT, begin_waiting, wait_free
from referral_proxy.journal import InUse, Reservation, Step
from referral_proxy.routing import MailboxMap


def _map() -> MailboxMap:
    return MailboxMap(MapConfig(default="b1"))


def _begin(m: MailboxMap, clock: task.Clock, name: str) -> defer.Deferred:
    return defer.ensureDeferred(begin_waiting(m, "carol", "move", [Reservation(name)], {}, clock))


def test_a_check_is_waited_for_and_the_waiter_then_holds_the_names():
    m, clock = _map(), task.Clock()
    checking = defer.ensureDeferred(m.begin_move("CAROL", "move", [Reservation("Shared/B")], {})).result
    waiting = _begin(m, clock, "Shared/B")
    status = defer.ensureDeferred(wait_free(m, "carol", [b"Shared/B/kid"], clock))
    clock.advance(0.5)
    assert not waiting.called and not status.called
    defer.ensureDeferred(m.end_move(checking))
    clock.pump([0.1] * 3)
    entry = waiting.result  # the waiter holds the names now (at its own check): the other still waits
    assert entry.step is Step.RESERVED and m.reserved("carol", "Shared/B") and not status.called
    defer.ensureDeferred(m.end_move(entry))
    clock.pump([0.1] * 3)
    assert status.result is True


def test_a_move_under_way_is_refused_at_once():
    m, clock = _map(), task.Clock()
    moving = defer.ensureDeferred(m.begin_move("carol", "move", [Reservation("Shared/B")], {})).result
    defer.ensureDeferred(m.step(moving, Step.PLANNED))
    waiting = _begin(m, clock, "Shared/B")
    clock.advance(0.01)
    assert waiting.called
    waiting.addErrback(lambda f: f.trap(InUse))
    status = defer.ensureDeferred(wait_free(m, "carol", [b"Shared/B"], clock))
    assert status.result is False


def test_a_check_that_never_ends_is_waited_for_at_most_wait_seconds():
    m, clock = _map(), task.Clock()
    defer.ensureDeferred(m.begin_move("carol", "move", [Reservation("Shared/B")], {}))
    waiting = _begin(m, clock, "Shared/B")
    refused = []
    waiting.addErrback(lambda f: refused.append(f.trap(InUse)))
    clock.pump([0.1] * int(WAIT * 10 - 2))
    assert not waiting.called
    clock.pump([0.1] * 10)
    assert refused == [InUse]
