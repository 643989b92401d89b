"""A session that ends answers first what its other backends have whole.

A client told BYE without the answer of a command a backend has whole (an APPEND saved, a COPY
made) sends it again on its next connection: twice. So before the proxy stops (service.py) and
before a session ends with its home or selected backend (session.backend_lost: ``DELETE`` of the
selected mailbox, where Dovecot says BYE), the commands already relayed to the OTHER backends are
answered as they are, a few seconds at most, and nothing more is read from the client (RFC 3501
5.5 lets a server run pipelined commands at once; Dovecot alone runs none after its BYE: probe f1
of stop 57, an APPEND stored and answered "may or may not be there").
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from .flow import Block

__all__ = ["ANSWER_WAIT", "owes_answer", "end_after_answers", "held_bye", "Hurry", "hurry", "when_due"]

ANSWER_WAIT = 3.0  # seconds the answers of commands under way are waited for before a BYE
_LOOK = 0.05


def owes_answer(session: Any) -> bool:
    """A relayed command, an APPEND whose last byte went to its backend (which commits it), or a command the
    proxy carries out itself (a COPY across: its answer came after the BYE, probe h3 of stop 58) is not
    answered yet (an IDLE never is: its DONE would have to come from the client)."""
    if session.closed or session.idle.current is not None:
        return False
    return (bool(session.relay.in_flight) or Block.TASK in session.flow.blocked
            or any(cmd.input_over for cmd in session.appends.unanswered))


class Hurry:
    """The clock of a RENAME across's wait for its answer past the commit point (mover.Mover.answer_clock): hurried
    (the session ends), that wait ends at once, and so does one begun later: the client hears OK ("the old mailbox is
    still being emptied") before its BYE, not nothing (probe j1 F4). The move's other waits keep the reactor's."""

    __slots__ = ("reactor", "calls", "hurried")

    def __init__(self, reactor: Any) -> None:
        self.reactor, self.hurried = reactor, False
        self.calls: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        call = self.reactor.callLater(0 if self.hurried else delay, f, *args, **kwargs)
        self.calls.append(call)
        return call

    def hurry(self) -> None:
        self.hurried = True
        for call in self.calls:
            if call.active():
                call.reset(0)


def hurry(session: Any) -> None:
    """A RENAME across *session* runs, past its commit point (or once there), answers now: it is ending."""
    clock = session.mailboxes.hurry
    if clock is not None:
        clock.hurry()


def held_bye(session: Any, backend: Any, reactor: Any) -> None:
    """A BYE from the backend *session* ends with is held: nothing more is read, and backend_lost ends the session
    with that BYE, last (probe j6 of stop 59). A backend that keeps the connection open after its BYE (Dovecot
    never does) is closed after ANSWER_WAIT, else the client would wait for good."""
    session.block(Block.STOPPING)
    reactor.callLater(ANSWER_WAIT, lambda: None if backend.closed else backend.transport.loseConnection())


def end_after_answers(session: Any, reactor: Any, bye: bytes | None) -> None:
    """End *session* once it owes no answer (or after ANSWER_WAIT): *bye* (None: its backend's own BYE was
    relayed), its backends logged out, the client's connection closed once that is out."""
    session.block(Block.STOPPING)
    hurry(session)
    deadline = reactor.seconds() + ANSWER_WAIT

    def look() -> None:
        if session.closed:  # the client went, or another end came first
            return
        if owes_answer(session) and reactor.seconds() < deadline:
            reactor.callLater(_LOOK, look)
            return
        session.end(bye)

    look()


async def when_due(finishing: defer.Deferred[Any], clock: Any, within: float | None) -> bool:
    """Wait for *finishing*, or (with a clock and *within*) at most *within* seconds: True if it still runs then (a
    RENAME across past its commit point, answered OK "still being emptied", mover.Mover.rename); its failure raised."""
    if clock is None or within is None:
        await finishing
        return False
    waiter: defer.Deferred[object] = defer.Deferred()

    def settled(outcome: object) -> None:
        if timer.active():
            timer.cancel()
        if not waiter.called:
            waiter.callback(outcome)  # None: time is up; a Failure fails the waiter: it is raised below
        # else: answered already; a failure was logged and the entry left to recovery

    timer = clock.callLater(within, settled, None)
    finishing.addBoth(settled)
    return await waiter is None
