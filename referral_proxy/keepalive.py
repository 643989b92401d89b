"""Backend connections kept across a user's sessions (``[proxy] backend_keepalive``).

A client that logs in, runs a few commands and logs out (webmail, a load generator, a
phone polling) costs the proxy and its backend a TCP connection, a greeting, an ID and
a login each time (Dovecot: imap-login, auth, a new imap process). When a session ends
and one of its backend connections is provably clean, the connection is parked for a
few seconds instead of logged out, and the next login whose credentials are exactly the
ones that logged it in (login name byte for byte, password, authzid), from the client
address the backend was told (ID x-originating-ip), to the same backend, takes it, as
up-imapproxy does. The client's LOGIN is answered, counted and logged as before.

Clean means: the session ran only commands that leave no state the proxy cannot undo
(:data:`REUSABLE`, a whitelist; no ENABLE, IDLE, COPY/MOVE/RENAME, nothing naming
CONDSTORE/QRESYNC/MODSEQ, which enable CONDSTORE for good), nothing in flight or half
read on either side, and the backend then answered UNSELECT (OK, or BAD: no mailbox
was selected, RFC 3691), whatever untagged responses of the old mailbox came before
being dropped. A parked connection that says anything at all, or closes, is dropped;
at expiry, ``backend_keepalive`` seconds after its login, it is logged out. Trade-off: a
password changed on the backend still works through a connection logged in with the old
one until then (docs/design.md), as with Dovecot's auth cache of that TTL.

A parked connection holds one of the user's slots on its backend (Dovecot's
mail_max_userip_connections, 10 by default): a login of the user under another key (another
password, client port, AUTHENTICATE with an authzid) refused ``NO [LIMIT]`` while some are
parked gets them logged out and is tried again, as it would have succeeded without them.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import AuthenticationFailed, BackendProtocol, Credentials, Tagged
from .commands import CONDSTORE_WORDS
from .config import BackendConfig
from .flow import Block
from .imap.command import Atom, ParenList, String, Token
from .imap.grammar import Arguments
from .imap.response import ResponseStart

__all__ = ["KeepAlive", "ReuseKey", "REUSABLE", "PER_USER", "IN_ALL", "taints"]

log = Logger()

#: Commands after which a session's backend connections may still be reused: none leaves
#: connection state but the selected mailbox (undone by UNSELECT before reuse). Anything
#: else (ENABLE, IDLE, ID after login, COPY/MOVE, RENAME, CANCELUPDATE, a command added
#: to the table later) makes the session's connections go with it.
REUSABLE = frozenset({
    "CAPABILITY", "NOOP", "LOGOUT", "SELECT", "EXAMINE", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE",
    "LIST", "LSUB", "RLIST", "RLSUB", "STATUS", "NAMESPACE", "GETQUOTA", "SETQUOTA", "GETQUOTAROOT",
    "SETACL", "DELETEACL", "GETACL", "LISTRIGHTS", "MYRIGHTS", "GETMETADATA", "SETMETADATA",
    "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "UID EXPUNGE", "SEARCH", "UID SEARCH", "FETCH", "UID FETCH",
    "STORE", "UID STORE", "SORT", "UID SORT", "THREAD", "UID THREAD",
})  # APPEND is not dispatched as a command (streamed): it changes no connection state either


# What may hold a session's input when it ends without anything still to reach a backend.
_HARMLESS = frozenset({Block.OUTPUT, Block.QUEUED, Block.TURN})
_HARMLESS_AT_LOGOUT = _HARMLESS | {Block.TASK}

PER_USER = 4  # connections parked per user (canonical login name), all backends and addresses
IN_ALL = 500  # connections parked in one proxy process
#: After a login refused [LIMIT] with the user's parked connections logged out: the waits before
#: each new try (Dovecot counts a connection until its imap process has exited, after the LOGOUT).
LIMIT_RETRIES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


@dataclass(frozen=True, slots=True)
class ReuseKey:
    """What must be equal for a login to take a parked connection."""

    backend: str
    endpoint: str
    tls: str  # and how it is secured: a reload that turns TLS on reuses no cleartext one (probe w1, stop 52)
    ca: str
    user: str  # the login name exactly as the backend was given it
    password: str = field(repr=False)
    authzid: str
    origin: tuple[str, ...]  # what the ID before login said of the client (x-originating-ip ...)


def taints(name: str, args: Arguments) -> bool:
    """Whether a command leaves state on its backend connection that the proxy cannot undo
    (the fast path's commands: fastpath.relay_plain asks CONDSTORE_WORDS itself)."""
    if name not in REUSABLE:
        return True
    return bool(CONDSTORE_WORDS.search(args.text)) if args.text is not None else _names_stateful(args.tokens)


def _names_stateful(tokens: tuple[Token, ...]) -> bool:
    for tok in tokens:
        if isinstance(tok, (Atom, String)) and CONDSTORE_WORDS.search(tok.value):
            return True
        if isinstance(tok, ParenList) and _names_stateful(tok.items):
            return True
    return False


class KeepAlive:
    """The parked connections of one proxy process, per ReuseKey, most recent last."""

    def __init__(self, reactor: Any, seconds: Callable[[], float], canonical: Callable[[str], str],
                 in_all: int | None = None) -> None:
        self._reactor = reactor
        self.in_all = IN_ALL if in_all is None else in_all  # fewer where the descriptors allow fewer (service.py)
        self._seconds = seconds  # read at every use: a reload may change it
        # The user as the map (and Dovecot's %Lu: ASCII letters only) names him. str.lower() made
        # "JOSÉ" (Dovecot: josÉ) and "josé", or "\u212aarl" (Kelvin sign) and "karl", one user:
        # one's [LIMIT] logged out the other's parked connections, and they shared PER_USER.
        self._canonical = canonical
        self._parked: dict[ReuseKey, list[BackendProtocol]] = {}
        self._timers: dict[BackendProtocol, Any] = {}  # parked or being cleaned -> its expiry
        self._per_user: dict[str, int] = {}
        self._sent: dict[BackendProtocol, int] = {}  # parked -> its bytes_out then: anything written since, not reused
        self.reused = 0  # logins that took a parked connection (metrics, tests)
        self.parked_total = 0
        self._stopped = False

    def __len__(self) -> int:
        return len(self._timers)

    @property
    def ready(self) -> int:
        """Parked connections a login can take now (their UNSELECT answered; len() counts those
        still being cleaned too)."""
        return sum(len(conns) for conns in self._parked.values())

    # -- a login -------------------------------------------------------------------------

    def key(self, backend: BackendConfig, creds: Credentials, origin: Any) -> ReuseKey | None:
        """The key of a connection made for a session (None: keepalive is off)."""
        if self._seconds() <= 0:
            return None
        said = (() if origin is None else
                (origin.client_ip, origin.local_ip, str(origin.local_port), str(origin.ttl)))
        return ReuseKey(backend.name, backend.endpoint, backend.tls, str(backend.ca or ""), creds.user, creds.password,
                        creds.authzid, said)

    async def connect(self, backend: BackendConfig, creds: Credentials, origin: Any,
                      opener: Callable[[], Awaitable[BackendProtocol]]) -> BackendProtocol:
        """A parked connection of exactly these credentials and origin, else *opener*'s new one
        (marked with its key, so that it may be parked when its session ends)."""
        key = self.key(backend, creds, origin)
        if key is not None and (parked := self.take(key)) is not None:
            return parked
        conn = await self._open(key, opener)
        conn.reuse_key, conn.logged_in_at = key, self._reactor.seconds()
        return conn

    async def _open(self, key: ReuseKey | None, opener: Callable[[], Awaitable[BackendProtocol]]) -> BackendProtocol:
        """*opener*'s connection. Its login refused [LIMIT] while the user has connections parked
        on that backend: they are logged out, and the login is tried again after each wait of
        LIMIT_RETRIES; the last refusal is the login's."""
        waits: Iterator[float] | None = None
        while True:
            try:
                return await opener()
            except AuthenticationFailed as e:
                if key is None or e.response.start.code != "LIMIT":
                    raise
                if waits is None:  # the first refusal
                    if not self._drop_user(key):
                        raise
                    waits = iter(LIMIT_RETRIES)
                if (wait := next(waits, None)) is None:
                    raise
            await task.deferLater(self._reactor, wait, lambda: None)

    def _drop_user(self, key: ReuseKey) -> bool:
        """Log out the connections parked for *key*'s user on its backend, whatever their key
        (whether their client address counts as the same IP there is the backend's business)."""
        who = self._who(key)
        mine = [conn for conn in self._timers if conn.reuse_key.backend == key.backend and self._who(conn.reuse_key) == who]
        for conn in mine:
            self._drop(conn)
        return bool(mine)

    def take(self, key: ReuseKey) -> BackendProtocol | None:
        """A parked connection logged in with exactly *key*, now the caller's alone; or None."""
        conns = self._parked.get(key)
        while conns:
            conn = conns.pop()
            sent = self._sent.get(conn)
            self._forget(conn, key)
            if (conn.closed or conn.bye_received or conn.busy or conn.bytes_out != sent or self._left(conn) <= 0
                    or unread_on_socket(conn)):
                conn.logout()  # (too old for backend_keepalive as reloaded since it was parked: probe x1, stop 52)
                continue
            conn.sink = None
            conn.reused_at = (conn.bytes_in, conn.bytes_out)  # session.backend_lost: found dead before any use?
            self.reused += 1
            return conn
        return None

    @staticmethod
    def unused(conn: BackendProtocol) -> bool:
        """Whether *conn*, taken for a session, has neither sent nor heard a byte since: lost so (its Dovecot killed
        after take()'s look), it may be forgotten as if never taken (probe y5 F2: OK to the LOGIN, then BYE)."""
        return conn.reused_at == (conn.bytes_in, conn.bytes_out)

    # -- a session's end -------------------------------------------------------------------

    def release(self, session: Any, by_logout: bool = False) -> None:
        """Park the clean backend connections of an ending *session* (taken out of its pool).
        *by_logout*: its LOGOUT, which may hold Block.TASK itself (it waited for quiet backends;
        no other task runs meanwhile: a task holds the session's input). Its pool empty (called again
        when the connection closes after a LOGOUT that parked them): nothing to check."""
        pool = session.pool
        harmless = _HARMLESS_AT_LOGOUT if by_logout else _HARMLESS
        if (pool is None or not pool.conns or self._stopped or not pool.reusable or pool.enabled or self._seconds() <= 0
                or session.reader.mid_command or session.relay.in_flight or session.appends.unanswered
                or pool.busy or pool._waiters or pool._connecting  # a command may still go to any of them
                or any(reason not in harmless for reason in session.flow.blocked)):  # a task or a login under way
            return
        for name, conn in list(pool.conns.items()):
            if (self._clean(conn) and not session.flow.out.holds(conn) and self._room(conn.reuse_key)
                    and self._left(conn) > 0):
                del pool.conns[name]
                session.flow.detach(conn)
                conn.transport.unregisterProducer()
                conn.transport.resumeProducing()  # it may have been paused for the client's sake
                self._clean_and_park(conn)

    @staticmethod
    def _clean(conn: BackendProtocol) -> bool:
        return (conn.reuse_key is not None and not conn.closed and not conn.bye_received and not conn.busy
                and not conn.enabled and "UNSELECT" in conn.capabilities and conn._current is None
                and conn._framer.idle and conn.on_continuation is None and conn.tap is None and conn.capture is None)

    def _left(self, conn: BackendProtocol) -> float:
        """Seconds *conn* may still be reused: backend_keepalive from its login, not from its last session.
        The backend checked the credentials then; a password changed since, an account disabled, a quota
        raised, kept working, or kept the old value, for a user who logged in again every few seconds, for
        good (probe w1, stop 52)."""
        return conn.logged_in_at + self._seconds() - self._reactor.seconds()

    def _who(self, key: ReuseKey) -> str:
        return self._canonical(key.authzid or key.user)

    def _room(self, key: ReuseKey) -> bool:
        return len(self._timers) < self.in_all and self._per_user.get(self._who(key), 0) < PER_USER

    def _clean_and_park(self, conn: BackendProtocol) -> None:
        key = conn.reuse_key
        assert key is not None
        conn.sink = self
        who = self._who(key)
        self._per_user[who] = self._per_user.get(who, 0) + 1
        self._timers[conn] = self._reactor.callLater(min(self._seconds(), self._left(conn)), self._expire, conn)
        self.parked_total += 1
        d = conn.command(b"UNSELECT")  # what came of the old mailbox before its answer is captured, dropped
        d.addCallbacks(lambda result: self._unselected(conn, result), lambda _f: self._drop(conn))

    def _unselected(self, conn: BackendProtocol, result: Tagged) -> None:
        key = conn.reuse_key
        if conn not in self._timers or key is None:
            return  # dropped meanwhile
        if result.start.status not in ("OK", "BAD") or conn.closed or conn.busy:
            return self._drop(conn)
        self._sent[conn] = conn.bytes_out
        self._parked.setdefault(key, []).append(conn)

    # -- while parked (ResponseSink) -----------------------------------------------------------

    def untagged(self, backend: BackendProtocol, start: ResponseStart | None, data: bytes, end: bool) -> None:
        """Anything unsolicited (a BYE, an alert, data): the connection is not reused."""
        log.debug("backend {name}: a parked connection spoke; dropped", name=backend.name)
        self._drop(backend)

    def backend_lost(self, backend: BackendProtocol, reason: Failure) -> None:
        self._drop(backend)

    def _expire(self, conn: BackendProtocol) -> None:
        self._drop(conn)  # LOGOUT

    def _drop(self, conn: BackendProtocol) -> None:
        key = conn.reuse_key
        if key is not None:
            conns = self._parked.get(key)
            if conns and conn in conns:
                conns.remove(conn)
            self._forget(conn, key)
        conn.sink = None
        conn.logout()

    def _forget(self, conn: BackendProtocol, key: ReuseKey) -> None:
        self._sent.pop(conn, None)
        timer = self._timers.pop(conn, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        who = self._who(key)
        left = self._per_user.get(who, 1) - 1
        if left > 0:
            self._per_user[who] = left
        else:
            self._per_user.pop(who, None)
        if not self._parked.get(key, True):
            del self._parked[key]

    def close(self) -> None:
        """The proxy stops: every parked connection is logged out, and none is parked again."""
        self._stopped = True
        for conn in list(self._timers):
            self._drop(conn)


def unread_on_socket(conn: BackendProtocol) -> bool:
    """The backend closed (or spoke) and the event loop has not read it yet: a Dovecot process killed right
    before a login took its parked connection handed over a dead one, the client answered OK, then BYE
    (probe y5 of stop 53: 1 login in 10). One MSG_PEEK of the TCP socket (under TLS too); False without one."""
    transport: Any = conn.transport
    for _ in range(3):  # TLS over TCP: the TCP transport's socket
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            try:
                handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"" (closed) or bytes unread
            except BlockingIOError:
                return False
            except OSError:
                return True
            return True
        transport = getattr(transport, "transport", None)
    return False
