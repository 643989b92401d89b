"""The backend connections of one client session, and the one place replicas are tried.

A session holds at most one connection per backend, opened on first use as its
user (own credentials, or the backend's master user acting as the user). What the
client ENABLEd is replayed on connections opened later. Responses of two backends
must not interleave on the client's connection, so a command for one backend
waits until every other is quiet (:meth:`BackendPool.quiet`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from .backend import AuthenticationFailed, BackendError, BackendProtocol, BackendUnavailable, Credentials
from .config import BackendConfig
from .context import Connect, ProxyContext
from .imap.grammar import Arguments
from .keepalive import taints
from .routing import Route

__all__ = ["BackendPool", "connect_first"]

log = Logger()


async def connect_first(names: Sequence[str], open_one: Callable[[str], Awaitable[BackendProtocol]]) -> BackendProtocol:
    """A connection to the first of *names* (a route's backends, in preference order)
    that answers. A refused login is final: replicas share the user's credentials."""
    last: BackendError | None = None
    for name in names:
        try:
            return await open_one(name)
        except AuthenticationFailed:
            raise
        except BackendError as e:
            last = e
    raise last or BackendUnavailable("no backend")


def backend_config(ctx: ProxyContext, name: str) -> BackendConfig:
    """The running configuration of *name* (a placement may name a backend a reload removed)."""
    cfg = ctx.config.backends.get(name)
    if cfg is None:
        raise BackendUnavailable(f"backend {name} is not configured")
    return cfg


class BackendPool:
    """Connections per backend for one user, with the ENABLEd extensions replayed."""

    __slots__ = (  # no per-instance dict: a proxy holds thousands of idle sessions
        "ctx", "_connect", "user", "_credentials", "_id", "_attach", "conns", "enabled", "replayed", "closed", "_connecting",
        "_waiters", "reusable", "_tell", "gone",
    )

    def __init__(self, ctx: ProxyContext, connect: Connect, user: str, credentials: Credentials, session_id: int,
                 attach: Callable[[BackendProtocol], None], tell: Callable[[BackendProtocol, bytes], None] | None = None
                 ) -> None:
        self.ctx = ctx
        self._connect = connect
        self.user = user
        self._credentials = credentials
        self._id = session_id
        self._attach = attach  # wires a new connection to the session (sink, back-pressure)
        self._tell = tell  # writes to the client what a replayed ENABLE brings of its selected mailbox
        self.conns: dict[str, BackendProtocol] = {}
        self.enabled: tuple[bytes, ...] = ()  # what the client ENABLEd, in order
        self.replayed: tuple[bytes, ...] = ()  # of those, what a backend answered OK: replayed on the others
        self.closed = False
        self._connecting: dict[str, defer.Deferred[BackendProtocol]] = {}
        self._waiters: tuple[tuple[BackendProtocol | None, defer.Deferred[None]], ...] = ()  # mostly none
        self.reusable = True  # no command left state keepalive.py cannot undo on these connections
        self.gone: tuple[str, ...] = ()  # backends the session ends with (forget): never connected to again

    # -- connections ----------------------------------------------------------------

    @property
    def login(self) -> Credentials:
        """The client's own credentials (referrals.url_user)."""
        return self._credentials

    def credentials_for(self, backend: BackendConfig) -> Credentials:
        """The user's own credentials, or the backend's master user acting as the user."""
        if backend.master_user is not None and backend.master_password is not None:
            return Credentials(user=backend.master_user, password=backend.master_password, authzid=self.user)
        return self._credentials

    async def open(self, name: str) -> BackendProtocol:
        """A new logged-in connection to *name*, not added to the pool."""
        cfg = backend_config(self.ctx, name)
        return await self._connect(cfg, self.credentials_for(cfg))

    def add(self, conn: BackendProtocol) -> None:
        self.conns[conn.name] = conn
        self.ctx.backend_caps[conn.name] = conn.capabilities
        self._attach(conn)
        holds = self.ctx.rename_holds
        if holds and (hold := holds.get((conn.name, self.user))) is not None:  # a RENAME there waits (renamehold.py)
            hold.add(conn)
        for hold in getattr(self.ctx, "remote_holds", {}).get((conn.name, self.user), ()):  # ... one at another proxy
            hold.add(conn)

    def ready(self, name: str) -> BackendProtocol | None:
        """The open connection to *name*, if there is one."""
        conn = self.conns.get(name)
        return conn if conn is not None and not conn.closed else None

    async def connection(self, route: Route | str) -> BackendProtocol:
        """The session's connection to the route's backend (replicas in order), opened on first use."""
        names = (route,) if isinstance(route, str) else route.backends
        try:
            return await connect_first(names, self._open_shared)
        except AuthenticationFailed as e:
            raise BackendUnavailable(f"a backend refused the login of {self.user}") from e

    async def _open_shared(self, name: str) -> BackendProtocol:
        """One opening per backend even when several commands ask at once."""
        conn = self.ready(name)
        if conn is not None:
            return conn
        if name in self.gone:
            raise BackendUnavailable(f"backend {name} connection lost")
        if name not in self._connecting:
            self._connecting[name] = defer.ensureDeferred(self.open(name))
        try:
            conn = await self._connecting[name]
        finally:
            self._connecting.pop(name, None)
        if self.closed:
            conn.logout()
            raise BackendUnavailable("session closed")
        if self.ready(name) is not conn:
            self.add(conn)
            log.info("session {id}: {user} also connected to {backend}", id=self._id, user=self.user, backend=name)
        return conn

    async def fresh(self, route: Route | str) -> BackendProtocol:
        """A NEW connection of the user to the route's backend (a transfer's own, never the session's)."""
        names = (route,) if isinstance(route, str) else route.backends
        return await connect_first(names, self.open)

    def forget(self, conn: BackendProtocol, *, for_good: bool = False) -> None:
        """*conn* is lost. *for_good*: the session ends with it (its home's or selected mailbox's backend); a command
        already waiting for that backend fails, never sent on a new connection without the session's selection
        (probe k2: a UID MOVE waiting for its turn, the backend restarted, got Dovecot's BAD No mailbox selected)."""
        if self.conns.get(conn.name) is conn:
            del self.conns[conn.name]
        if for_good:
            self.gone += (conn.name,)
        self.check_quiet()

    def logout_all(self) -> None:
        self.closed = True
        conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            conn.sink = None
            conn.logout()

    # -- ENABLE ---------------------------------------------------------------------

    def remember_enabled(self, names: Sequence[bytes]) -> None:
        for name in names:
            if name.upper() not in self.enabled:
                self.enabled += (name.upper(),)

    def confirm_enabled(self, names: Sequence[bytes]) -> tuple[bytes, ...]:
        """The client's ENABLE of *names* was answered OK: replayed from now on (returned: all that is). Not
        before: a replay pipelined behind that ENABLE would capture its ``* ENABLED`` (the client's answer)."""
        for name in names:
            if name.upper() not in self.replayed:
                self.replayed += (name.upper(),)
        return self.replayed

    def note(self, name: str, args: Arguments) -> None:
        """A command about to be relayed: one that leaves state the proxy cannot undo ends the connections'
        reuse (keepalive.taints)."""
        if self.reusable and taints(name, args):
            self.reusable = False

    def condstore_used(self, conn: BackendProtocol) -> None:
        """A command relayed to *conn* enabled CONDSTORE there without an ENABLE (RFC 7162 3.1: for the rest
        of the session): replayed on every other connection, as an ENABLE is. Without it, a SELECT on
        another backend gave no HIGHESTMODSEQ and its FETCHes no MODSEQ (probe 6, stop 48)."""
        conn.enabled.add(b"CONDSTORE")  # (there already: no ENABLE replayed before its next command)
        if b"CONDSTORE" not in self.replayed:
            self.replayed += (b"CONDSTORE",)

    def enabled_where_announced(self, name: bytes, backend: str) -> bool:
        """*name* ENABLEd by the client and announced by *backend*: else ENABLE enabled nothing there (RFC 5161
        3.1: a server ignores a name it does not support; Dovecot 2.3 and UTF8=ACCEPT, then a UTF-8 name is NO)."""
        return name in self.enabled and name.decode("ascii") in self.ctx.backend_caps.get(backend, frozenset())

    async def prepare(self, conn: BackendProtocol) -> None:
        """Replay what the client ENABLEd on a connection that has not seen it."""
        missing = [e for e in self.replayed if e not in conn.enabled]
        if missing:
            done = await conn.command(b"ENABLE " + b" ".join(missing))
            conn.enabled.update(missing)
            if (tell := self._tell) is not None:  # (RFC 7162 3.1: CONDSTORE enabled by a command to another
                for r in done.responses:  # backend while a mailbox is selected: its HIGHESTMODSEQ; probe 1, stop 49)
                    if r.start.name != "ENABLED":  # of the selected mailbox: only its connection has one
                        tell(conn, r.raw)

    def fast(self, name: str) -> BackendProtocol | None:
        """The connection to relay to at once, if nothing has to happen first."""
        conn = self.conns.get(name)
        if conn is None or conn.closed:
            return None
        for other in self.conns.values():
            if other is not conn and other.busy:
                return None
        if self.replayed and any(e not in conn.enabled for e in self.replayed):
            return None
        return conn

    async def ready_for(self, route: Route | str) -> BackendProtocol:
        """A connection to relay to: open, every other backend quiet, ENABLEs replayed."""
        conn = await self.connection(route)
        await self.quiet(conn)
        await self.prepare(conn)
        return conn

    # -- quiet ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return any(c.busy for c in self.conns.values())

    def busy_except(self, conn: BackendProtocol | None) -> bool:
        return any(c.busy for c in self.conns.values() if c is not conn)

    def _is_quiet(self, conn: BackendProtocol | None) -> bool:
        return not (self.busy_except(conn) if conn is not None else self.busy)

    def quiet(self, conn: BackendProtocol | None) -> defer.Deferred[None]:
        """Fires once no backend but *conn* has a command in flight (None: no backend at all)."""
        if self._is_quiet(conn):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters += ((conn, d),)
        return d

    def check_quiet(self) -> None:
        """A command completed somewhere: wake whoever waited for quiet."""
        waiters, self._waiters = self._waiters, ()
        for conn, d in waiters:
            if self._is_quiet(conn):
                d.callback(None)
            else:
                self._waiters += ((conn, d),)
