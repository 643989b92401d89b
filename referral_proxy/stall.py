"""A backend that owes the proxy an answer and sends nothing: its connection cut after ``answer_timeout``.

Why: a backend STOPPED (SIGSTOP, a hung disk, a paused VM) while a command the proxy carries
out itself waits on it (a merged LIST or LSUB, the reads of a COPY across servers) never
answers; stayalive.py's ``* OK Hang in there..`` every 15 s then defeats the client's own
timeout, and the client hangs for ever (helper attack14c on real Dovecot). A relayed command is
not the proxy's to bound: the proxy sends nothing of its own meanwhile, the client's timeout works.

What: :class:`Watch`, armed for ONE internal command (``BackendProtocol.command(...,
bounded=True)``), looks every ``seconds / 4`` at the connection's byte counters (``bytes_in`` +
``bytes_out``, kept anyway for the metrics: nothing is added to the read or write path). The clock
restarts on any byte either way, and while the proxy itself does not read the connection
(back-pressure: a client that does not read, a COPY's destination that is slow): a backend cannot
send what nobody reads. After ``seconds`` with neither, the connection is aborted; the
connection-lost paths answer the client (``NO [UNAVAILABLE]``) and the session goes on (but for
a cut of its home backend's own connection, a MOVE's source: the session ends as when that
backend dies). Nothing is cut while another command is in flight on the connection (it may
write). The watch ends with its command (answer or loss). IDLE is never watched: it is relayed,
never bounded.

MAIL FIRST: where the timeout may cut. Cutting a connection is only safe where no commit can be
in doubt: a stopped backend that already received a command which WRITES (APPEND, COPY, MOVE,
EXPUNGE, STORE, CREATE, RENAME, DELETE, SUBSCRIBE) may carry it out when it resumes, after the
proxy gave up and answered, rolled back or recovered: the message twice, or a source expunged
while its only copy is the one in doubt. So only commands that READ are bounded:

* merged LIST / LSUB (session.gather) and every listing read behind it;
* a plain STATUS relayed to a backend other than the session's home (fastnames.py), while it
  is the only command in flight on its connection (another may write);
* STATUS, UID SEARCH, MYRIGHTS of a transfer's checks and verifications (mailops.py) and the
  bodies' ``UID FETCH`` (copystream.py: the source's, streamed into the destination's
  MULTIAPPEND, and the hashes read back). Internal commands on a connection run one at a time,
  each awaited: when a read is cut, every write sent before it on that connection was answered,
  so nothing is in doubt there. A cut source FETCH fails copy_stream, which aborts the
  destination before the MULTIAPPEND's last CRLF: nothing is committed. For the operation, a
  cut read is its connection lost, as when the backend is killed and restarted with its data;
  every journal step of that path is proved by tests/race_hang.py (SIGKILL at each step);
* never the destination's APPEND (copystream.py's streamed MULTIAPPEND, a staged MULTIAPPEND,
  appends.py), never COPY/MOVE/EXPUNGE/RENAME/DELETE/CREATE/UNSELECT: those keep today's
  behaviour (wait, stayalive lines; the journal and recovery finish them once the backend is
  back or restarted; tests/race_hang.py).

A backend resumed after its cut finds its socket reset: it answers a read into nothing, which
costs no mail (tests/test_stall.py: census after SIGCONT and after SIGKILL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.logger import Logger

__all__ = ["Watch", "reading"]

log = Logger()
T = TypeVar("T")


def reading(clock: Any, conn: Any) -> bool:
    """Whether the reactor reads *conn*'s socket (not paused by the proxy: back-pressure).

    The transport (TLS wraps TCP: its ``.transport``) is looked for among the reactor's
    readers; a clock that has none (a test's) reads everything."""
    readers = getattr(clock, "getReaders", None)
    if readers is None:
        return True
    now = readers()
    t = getattr(conn, "transport", None)
    while t is not None:
        if t in now:
            return True
        t = getattr(t, "transport", None)
    return False


class Watch:
    """Aborts *conn* once it owes an answer and moved no byte for *seconds* while read."""

    __slots__ = ("clock", "conn", "seconds", "what", "tag", "_reading", "_count", "_since", "_call")

    def __init__(self, clock: Any, conn: Any, seconds: float, what: str, tag: bytes | None = None,
                 is_reading: Callable[[Any, Any], bool] = reading) -> None:
        """*tag*: the proxy's tag of a relayed read (a remote STATUS): the watch ends with it
        (no cancel() needed), and never cuts while another command is in flight on *conn*
        (it may write)."""
        self.clock, self.conn, self.seconds, self.what, self.tag = clock, conn, seconds, what, tag
        self._reading = is_reading
        self._count = conn.bytes_in + conn.bytes_out
        self._since = clock.seconds()
        self._call: Any = clock.callLater(self._step(), self._tick)

    @classmethod
    def bounding(cls, conn: Any, command: bytes, tag: bytes | None = None) -> Watch | None:
        """A watch of *conn* for its *command* (a read; *tag*: a relayed one's), unless ``answer_timeout = 0``."""
        seconds = conn.config.answer_timeout
        if not seconds or conn.clock is None:
            return None
        return cls(conn.clock, conn, seconds, command.split(b" ", 1)[0].decode("ascii", "replace"), tag)

    @staticmethod
    def why(conn: Any) -> str:
        """What a command of a connection cut by a watch is told."""
        return f"sent no answer for {conn.config.answer_timeout:g}s"

    def _step(self) -> float:
        return max(0.05, self.seconds / 4)

    def cancel(self) -> None:
        """The command ended (its answer, or the connection's loss)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def ended(self, result: T) -> T:
        """cancel(), as a callback of the command's Deferred."""
        self.cancel()
        return result

    @property
    def active(self) -> bool:
        return self._call is not None

    def _tick(self) -> None:
        conn, now = self.conn, self.clock.seconds()
        if self._call is None or conn.closed:
            self._call = None
            return
        pending = conn._pending
        if self.tag is not None and self.tag not in pending:
            self._call = None
            return
        count = conn.bytes_in + conn.bytes_out
        if count != self._count or len(pending) > 1 or not self._reading(self.clock, conn):
            self._count, self._since = count, now
        elif now - self._since >= self.seconds:
            self._call = None
            log.warn("backend {name}: no answer to {what} and not a byte for {s:g}s; connection cut",
                     name=conn.name, what=self.what, s=self.seconds)
            conn.stalled = True
            conn.transport.abortConnection()
            return
        self._call = self.clock.callLater(self._step(), self._tick)
