"""A client that half-closes (``shutdown(SHUT_WR)``, ``nc -N``, a script piping commands) gets the answers
of the commands it sent whole, then the connection closes: as Dovecot answers what it read before the end
of its input. Without this, Twisted took the end of input for the end of the connection: an APPEND the
backend saved went unanswered, and a client told nothing sends it again (twice).

A command the end of input cut is never run: one the proxy was still reading whole (half a line, half a
literal of a CREATE) waits, unsent, while the commands before it are answered (`printf 'a NOOP\r\nb APPEND
...\r\nc LOGOUT' | nc -N`: the APPEND saved, and answered); one a backend has begun (an APPEND's message
cut, an IDLE never DONE, a SASL exchange) ends the session at once, as does a client that has not read its
answers after MAX_WAIT: what is in flight is answered only if it already was."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from .phase import Phase

__all__ = ["HalfClose", "POLL_SECONDS", "MAX_WAIT"]

POLL_SECONDS = 0.05  # how often a half-closed session looks whether all is answered
MAX_WAIT = 900.0  # seconds it waits at most (a RENAME across may take minutes: then it is cut, as before)


@implementer(IHalfCloseableProtocol)
class HalfClose:
    """Mixed into the client session (session.py): Twisted's half-close interface."""

    input_ended = False  # (a read resumed after the end is told again: looked at once)

    def readConnectionLost(self) -> None:
        session: Any = self
        if session.phase is Phase.LOGOUT or self.input_ended:
            return
        self.input_ended = True
        until = session.ctx.reactor.seconds() + MAX_WAIT
        poll: LoopingCall = LoopingCall(_answered_or_cut, session, lambda: poll.stop(), until)
        poll.clock = session.ctx.reactor
        poll.start(POLL_SECONDS, now=True)

    def writeConnectionLost(self) -> None:
        pass  # never: the proxy does not half-close its side


def _answered_or_cut(session: Any, stop: Any, until: float) -> None:
    """Close once nothing sent whole is left unanswered; at once if what is left can never end."""
    if session.phase is Phase.LOGOUT or session.transport is None or getattr(session.transport, "disconnected", False):
        return stop()
    session._pump()  # commands read whole and not dispatched yet (a turn given to others)
    flow = session.flow
    reader = session.reader
    cut = ((not flow.blocked and reader.starved and (reader.streaming or reader.expecting_line))
           or session.ctx.reactor.seconds() > until)
    # (cut: a message, an IDLE never DONE, a SASL response: a backend waits for its rest; or no end after
    # MAX_WAIT. Half a command still being read is not: nothing of it was sent; those before it are answered.)
    if not cut and (session.relay.in_flight or session.appends.unanswered or flow.blocked):
        return None  # answers still to come (a command of the proxy's own holds the input meanwhile)
    stop()
    session._close()  # (the session's end aborts what is cut: nothing of it is saved)
