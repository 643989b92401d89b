"""The running proxy as a Twisted service: listeners, shared session context, reload.

Everything that touches the reactor is given one; this module is what twistd,
the CLI and the tests all start.
"""

from __future__ import annotations

import gc
import os
import sqlite3
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from . import crossturns, netio, peerholds, proxyappends, stayalive, workerholds
from .admission import FD_RESERVE, FDS_PER_SESSION, Admission, file_descriptors, sessions_for
from .backend import BackendProtocol, BackendUnavailable, Credentials
from .backendlogin import connect_backend
from .config import BackendConfig, Config, ConfigError, keep_restart_only, load_config
from .context import ProxyContext
from .flow import Block
from .health import HealthChecker
from .keepalive import IN_ALL
from .lastanswers import ANSWER_WAIT, hurry, owes_answer
from .metrics import StoreTotals, make_registry, metrics_site
from .observe import Observer
from .openstore import open_store
from .origin import LoopGuard, id_command
from .proxyproto import listen_endpoint
from .recovery import RecoverySweep
from .reloadguard import still_named
from .relocation import RelocationWatch
from .renamehold import hold_for_another
from .routing import MailboxMap, StepHook
from .session import ClientSession
from .workers import (
    ACCEPTED,
    STARTED,
    WorkerPool,
    bind_listeners,
    check_shareable,
    inherited_endpoint,
    metrics_listen,
    watch_master,
    worker_role,
)

__all__ = ["ProxyService", "check_endpoints", "load_and_check"]

log = Logger()

SHUTDOWN_GRACE = 5.0  # seconds clients get to receive their BYE at shutdown (of it, lastanswers.ANSWER_WAIT)


def check_endpoints(config: Config, reactor: Any) -> None:
    """Refuse endpoint strings Twisted cannot parse, naming the key (nothing is bound)."""
    for i, spec in enumerate(config.proxy.listen):
        try:
            serverFromString(reactor, spec)
        except Exception as e:  # ValueError, KeyError, OpenSSL errors for ssl: files ...
            raise ConfigError(f"proxy.listen[{i}]: bad endpoint {spec!r}: {e or type(e).__name__}") from None
    for name, backend in config.backends.items():
        try:
            clientFromString(reactor, backend.endpoint)
        except Exception as e:
            raise ConfigError(f"backends.{name}.endpoint: bad endpoint {backend.endpoint!r}: {e or type(e).__name__}") from None
    if config.metrics.listen is not None:
        try:
            serverFromString(reactor, config.metrics.listen)
        except Exception as e:
            raise ConfigError(f"metrics.listen: bad endpoint {config.metrics.listen!r}: {e or type(e).__name__}") from None
    if config.proxy.tls_cert is not None:
        try:
            server_tls_options(config)
        except Exception as e:
            raise ConfigError(f"proxy.tls_cert: cannot load certificate and key: {e}") from None
    if config.proxy.workers > 1:
        check_shareable(reactor, config.proxy.listen)


def load_and_check(path: str, reactor: Any) -> Config:
    """Load the file and check its endpoints: a Config, or one ConfigError. A worker's first load takes the
    text its master runs (workers.ACCEPTED), not the file: one the master refused to reload is not run by a
    worker it starts again (probe r2, stop 50: a worker killed and restarted ran without a backend)."""
    text, started = os.environ.pop(ACCEPTED, None), os.environ.pop(STARTED, None)
    if started is None:
        return load_config(path, check_endpoints=lambda c: check_endpoints(c, reactor), text=text)
    # ... with the master's values of what a reload does not change (a reload it accepted may name others)
    config = keep_restart_only(load_config(path, text=text), load_config(path, text=started))
    check_endpoints(config, reactor)
    return config


def server_tls_options(config: Config) -> Any:
    """STARTTLS context from ``[proxy] tls_cert`` / ``tls_key``."""
    assert config.proxy.tls_cert is not None and config.proxy.tls_key is not None
    pem = config.proxy.tls_cert.read_bytes() + b"\n" + config.proxy.tls_key.read_bytes()
    return PrivateCertificate.loadPEM(pem).options()


# Allocations between two young collections (Python's default: 700). A session makes a
# few hundred objects that live for its length, so at 700 the collector runs every few
# commands under load; higher lets most of them die by reference count first.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """What start-up made lives for the whole process: frozen, never scanned again, and
    young collections less often (~18 us per stress op at the defaults)."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(max(_young, GC_YOUNG_THRESHOLD), middle, old)


def admission_for(config: Config) -> Admission:
    """The process's Admission, its sessions bounded by the file descriptors it may open
    (the soft limit is raised first as far as the hard one allows)."""
    wanted = config.proxy.connections.max_connections * FDS_PER_SESSION + FD_RESERVE + IN_ALL
    fds = file_descriptors(wanted)
    # Parked backend connections hold descriptors too (a reload may turn backend_keepalive on): left out,
    # a full set of them made accept() fail, clients closed without a greeting (probe y5 of stop 53).
    parked = min(IN_ALL, fds // 4)
    admission = Admission(sessions_for(fds - parked), fd_parked=parked)
    if admission.max_connections(config.proxy.connections) < config.proxy.connections.max_connections:
        log.warn("max_connections {configured} lowered to {allowed}: this process may open {fds} file descriptors "
                 "(ulimit -n), {per} per session, {parked} for backend connections parked between sessions and a reserve",
                 configured=config.proxy.connections.max_connections, allowed=admission.fd_sessions, fds=fds,
                 per=FDS_PER_SESSION, parked=parked)
    return admission


class _SessionFactory(ServerFactory):
    noisy = False

    def __init__(self, context: ProxyContext) -> None:
        self.context = context

    def buildProtocol(self, addr: Any) -> ClientSession:
        # One context shared by every session (a reload swaps its configuration for all);
        # a session connects through context.connect_for, which knows the session.
        session = ClientSession(self.context)
        session.factory = self
        return session


class ProxyService(MultiService):
    """The proxy: one listener service per ``[proxy].listen`` endpoint (and /metrics).

    With ``[proxy] workers`` above 1 this process is the master of that many workers
    (workers.py): it binds the listeners, starts the workers and recovers moves, and
    serves no client itself; a worker (started by a master) listens on the sockets it
    inherited and serves /metrics on the configured port plus its index."""

    log_observer: Any = None  # set by tap.py: given to twistd's application as its log observer
    log_stream: Any = None  # where this process's log goes (a master writes its workers' lines there)

    def __init__(self, config: Config, reactor: Any, *, on_step: StepHook | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.role = worker_role()  # set when a master started this process
        self.is_master = config.proxy.workers > 1 and self.role is None
        self.workers: WorkerPool | None = None
        self._reloads = 0  # SIGHUPs taken: one whose check of the map ends after a later one's does not apply
        self._ports: list[Any] = []
        self._peer_port: Any = None  # the other proxies on the SQLite map file ask holds here (peerholds.py)
        # on_step: called after each journal step (tests inject faults there; None in production)
        try:
            store = open_store(config.map.store, reactor, lease_seconds=config.map.lease_seconds, serving=True)
        except (OSError, sqlite3.Error) as e:  # one line, not a traceback (probe y5 of stop 53: a directory not writable)
            raise ConfigError(f"map.store: cannot open {config.map.store}: {e}") from None
        self.mailbox_map = MailboxMap(config.map, store, on_step=on_step)
        # Run by the master (or the only process): entries are claimed by owner, so a worker's
        # move is recovered once that worker is gone, never while it runs.
        self.recovery = RecoverySweep(reactor, lambda: self.config, self.mailbox_map)  # the config as reloaded
        self.guard = LoopGuard(config)
        self.observer = Observer(self.guard, clock=reactor.seconds, backends=tuple(config.backends))
        self.admission = admission_for(config)

        async def connect(backend: BackendConfig, credentials: Credentials):
            return await self.connect_for(None, backend, credentials)

        self.context = ProxyContext(
            config=config,
            mailbox_map=self.mailbox_map,
            reactor=reactor,
            connect=connect,
            server_tls=server_tls_options(config) if config.proxy.tls_cert else None,
            observer=self.observer,
            admission=self.admission,
            connect_for=self.connect_for,
            worker_turns=crossturns.beside_store(config.map.store, reactor) or (
                crossturns.from_environment(reactor) if self.role is not None else None),
            proxy_turns=crossturns.from_store(config.map.store, reactor),
        )
        self.recovery.turns = self.context  # a move it finishes waits for a relayed MOVE of its source
        factory = self._factory = _SessionFactory(self.context)
        self.relocation = RelocationWatch(reactor, self.mailbox_map, self.context.sessions)
        self.context.look_at_sessions = self.relocation.check  # (before a move's new entry is confirmed: proxyappends)
        self.waiting = stayalive.Waiting(reactor, self.context.sessions)  # a client gone during a stall is seen
        self.health: HealthChecker | None = None
        if config.metrics.listen is not None and not self.is_master:
            self.health = HealthChecker(reactor, config.backends, config.metrics.health_interval)
            # the admin moves' totals, counted in the map store by `referral-proxy move`
            totals = StoreTotals(self.mailbox_map.store.transfer_counts, reactor)
            site = metrics_site(make_registry(self.observer, self.health, self.admission, totals,
                                              self.context.keepalive), self.health, totals)
            listen = config.metrics.listen if self.role is None else metrics_listen(config.metrics.listen, self.role.index)
            svc = StreamServerEndpointService(serverFromString(reactor, listen), site)
            svc._raiseSynchronously = True
            svc.setName("metrics")
            svc.setServiceParent(self)
        for name, backend in config.backends.items():
            if self.guard.is_self(backend):
                log.warn("backend {name} ({endpoint}) is one of this proxy's own listeners: logins routed to it "
                         "are refused (proxy loop)", name=name, endpoint=backend.endpoint)
            if backend.master_user is None and len(config.backends) > 1 and self.role is None:  # (probe 6, stop 48)
                log.warn("backend {name} has no master_user: a COPY/MOVE/RENAME across servers cut off there (a "
                         "crash, a backend failure) cannot be recovered, and its mailboxes stay held (NO [INUSE]) "
                         "until one is set", name=name)
        self.listeners = []
        if self.role is not None and len(self.role.listeners) != len(config.proxy.listen):
            raise RuntimeError("[proxy] listen changed since the master started: restart the service")
        for i, spec in enumerate(() if self.is_master else config.proxy.listen):
            if self.role is not None:
                fd, family = self.role.listeners[i]
                endpoint = inherited_endpoint(reactor, spec, fd, family, config.proxy.login_timeout,
                                              config.proxy.trusted_networks)
            else:
                endpoint = listen_endpoint(reactor, spec, config.proxy.login_timeout,
                                           trusted=config.proxy.trusted_networks)
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True  # a port in use stops start-up with that error
            svc.setName(spec)
            svc.setServiceParent(self)
            self.listeners.append(svc)

    async def connect_for(self, session: ClientSession | None, backend: BackendConfig,
                          credentials: Credentials) -> BackendProtocol:
        """A logged-in connection to *backend* for *session*: told who the client is (ID before
        login, to backends that announce ID), counted; never one to this proxy itself."""
        if self.guard.is_self(backend):
            raise BackendUnavailable(f"backend {backend.name} ({backend.endpoint}) is this proxy's own listener "
                                     "(proxy loop)")
        # Built only for a new connection (a parked one taken has been told already): the
        # session's Origin does not change once a login is under way (no ID read meanwhile).
        origin = self.observer.origin(session) if session is not None else None

        async def before_login(proto: BackendProtocol) -> None:
            if origin is not None and "ID" in proto.capabilities:
                # its answer does not matter: the login goes right behind it
                proto.send_unanswered(id_command(origin))

        async def opened() -> BackendProtocol:
            try:
                proto = await connect_backend(self.reactor, backend, credentials, before_login=before_login)
            except BackendUnavailable:
                self.observer.connect_failed(backend.name)
                raise
            self.observer.backend_opened(proto)
            return proto

        if session is None:  # the proxy's own (recovery, admin moves): never parked, never a parked one
            return await opened()
        # A session's: one parked by a session of exactly these credentials and client address, if any.
        return await self.context.keepalive.connect(backend, credentials, origin, opened)

    def setServiceParent(self, parent: Any) -> Any:
        result = super().setServiceParent(parent)
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.log_observer)
        return result

    def startService(self) -> None:
        netio.install(self.reactor)  # before the first connection: writes sent at the end of each loop pass
        tune_gc()
        # The map first: a PostgreSQL store that is unreachable or has no (or an old) schema
        # stops start-up with one line (runner.py prints it) before anything listens.
        if hasattr(self.mailbox_map.store, "on_new_entries"):  # a RENAME at another proxy waits for our APPENDs
            self.mailbox_map.store.on_new_entries = proxyappends.confirmer(self.context, self.mailbox_map.store)
        self.mailbox_map.start()
        self.mailbox_map.start_leases(self.reactor, self.config.map.lease_seconds / 4, sweeps=self.role is None)
        store = self.mailbox_map.store
        if hasattr(store, "on_availability"):
            store.on_availability = self.observer.map_store_available
        if self.is_master:
            # bound here, before any worker starts (an address in use stops start-up)
            self._ports = bind_listeners(self.reactor, self.config.proxy.listen, self._factory,
                                         self.config.proxy.login_timeout)
        super().startService()
        if self.health is not None:
            self.health.start()
        self.waiting.start()
        self.relocation.start()  # every process with sessions: those whose mail moved away end
        if self.is_master:
            assert self.config.path is not None, "workers need the configuration file (they read it themselves)"
            self.workers = WorkerPool(self.reactor, str(self.config.path), self.config.proxy.workers, self._ports,
                                      self.log_stream, on_death=self.recovery.now, accepted=lambda: self.config.text,
                                      started=self.config.text)
            where = peerholds.map_file(self.config.map.store)
            peers = peerholds.PeerHolds(where, self.reactor) if where else None
            self.context.worker_holds = self.workers.holds_for(self.context, peers)  # (a move it recovers)
            if where and self.workers.peer_holds is not None:
                self._listen_peers(where, self.workers.peer_holds.hold)
            self.workers.start()
            log.info("referral-proxy listening on {listen} with {n} workers", listen=", ".join(self.config.proxy.listen),
                     n=self.config.proxy.workers)
        elif self.role is not None:
            holds = self.context.worker_holds = workerholds.from_environment(self.context)
            watch_master(self.reactor, self._master_gone, on_data=holds.received if holds is not None else None)
            log.info("worker {index} of {n} serving {listen}", index=self.role.index, n=self.role.count,
                     listen=", ".join(self.config.proxy.listen))
            return  # moves are recovered by the master alone
        else:
            log.info("referral-proxy listening on {listen}", listen=", ".join(self.config.proxy.listen))
            where = peerholds.map_file(self.config.map.store)
            if where:
                self.context.worker_holds = peerholds.PeerHolds(where, self.reactor)
                self._listen_peers(where, lambda backend, user: hold_for_another(self.context, backend, user))
        # Moves a stopped proxy (or a dead worker) left half done are finished or rolled back
        # now, and any given up on later are retried periodically (recovery.SWEEP_SECONDS).
        self.recovery.start()

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[override]
        """Stop listening, say BYE to every client, log the backends out, and wait (a few
        seconds at most) until the BYEs are really out before the reactor tears down."""
        if self.health is not None:
            self.health.stop()
        self.observer.stopping = True
        if self.workers is not None:
            yield self.workers.stop()  # each says BYE to its own clients
            for port in self._ports:
                yield port.stopListening()
        yield super().stopService()
        self.recovery.stop()
        self.relocation.stop()
        self.waiting.stop()
        self.context.keepalive.close()
        sessions = list(self.context.sessions)
        # A client told BYE without the answer of a command its backend has whole (an APPEND saved, a
        # COPY made) sends it again on its next connection: twice. Direct Dovecot answers it, then BYE.
        for s in sessions:
            s.block(Block.STOPPING)  # what a client is still sending is cut by the BYE: nothing of it saved
            hurry(s)  # a RENAME across past its commit point is answered now (recovery finishes what is left)
        yield self._until(lambda: not any(owes_answer(s) for s in sessions), ANSWER_WAIT)
        closed = [s.when_closed() for s in sessions]
        for session in sessions:
            session.shutdown()
        if closed:
            # consumeErrors: the timeout cancels each one still open (a client that reads nothing): no
            # "Unhandled error in Deferred" for those, and the list fires normally, so they are counted here
            everyone = defer.DeferredList(closed, consumeErrors=True)
            everyone.addTimeout(SHUTDOWN_GRACE, self.reactor)
            try:
                results = yield everyone
            except defer.TimeoutError:
                results = [(False, None)] * len(closed)
            if left := sum(not ok for ok, _ in results):
                log.warn("{n} client connection(s) still open after {s}s; closing anyway", n=left, s=SHUTDOWN_GRACE)
        # A staged MULTIAPPEND the stop cut deletes its staging mailbox over a connection of its own
        # (staging.Staging.cleanup): left for the next start's recovery if the store closed first.
        journal = self.context.staging_journal
        yield self._until(lambda: journal is None or not journal.open, SHUTDOWN_GRACE)
        if self._peer_port is not None:
            yield self._peer_port.stopListening()
        if self.context.worker_turns is not None:
            self.context.worker_turns.close()  # (its lock files kept open for APPENDs: removed if free)
        yield defer.ensureDeferred(self.mailbox_map.close())

    @defer.inlineCallbacks
    def _until(self, done: Any, seconds: float):  # type: ignore[no-untyped-def]
        """Fires once *done()* is true, looked at every 50 ms, or after *seconds* (a stop waits no longer)."""
        deadline = self.reactor.seconds() + seconds
        while not done() and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, 0.05, lambda: None)

    def _listen_peers(self, where: peerholds.MapFile, hold_here: Any) -> None:
        try:
            self._peer_port = peerholds.listen(where, self.reactor, hold_here)
        except CannotListenError as e:  # (only RENAMEs of the other proxies on the map file miss it)
            log.warn("the socket other proxies on the map file ask RENAME holds on: {why}", why=str(e))

    def reload(self, path: str | None = None) -> None:
        """SIGHUP: read the file again; backends and map rules change together, for new
        commands of every session (its own connections stay, but one to a backend given another
        endpoint ends the session: relocation.moved). A bad file changes nothing."""
        path = path or (str(self.config.path) if self.config.path else None)
        if path is None:
            return
        try:
            config = load_and_check(path, self.reactor)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: {why}", why=str(e))
            return
        removed = set(self.config.backends) - set(config.backends)
        repointed = {b for b in set(self.config.backends) & set(config.backends)
                     if self.config.backends[b].endpoint != config.backends[b].endpoint}
        self._reloads += 1
        if removed or repointed:  # applied only once nothing in the map names them (reloadguard.py)
            defer.ensureDeferred(self._reload_unless_named(path, config, removed, repointed))
            return
        self._apply(path, config)

    async def _reload_unless_named(self, path: str, config: Config, removed: set[str], repointed: set[str]) -> None:
        reload = self._reloads
        try:
            named = await still_named(self.context.mailbox_map, removed, repointed)
        except Exception as e:  # StoreUnavailable mostly: what names them cannot be known
            named = [f"the journal cannot be read ({e})"]
        if reload != self._reloads:  # a later SIGHUP's file came meanwhile: this older one would undo it (probe c3)
            log.warn("reload of {path} dropped: a later one came while the map was being checked", path=path)
            return
        if named:
            log.error("reload refused, keeping the running configuration: backend(s) {b} still named: {named}",
                      b=", ".join([f"{b} removed" for b in sorted(removed)] + [f"{b} with a new endpoint"
                                                                            for b in sorted(repointed)]),
                      named="; ".join(named[:10]))
            return
        self._apply(path, config)

    def _apply(self, path: str, config: Config) -> None:
        if config.proxy.listen != self.config.proxy.listen:
            log.warn("reload: [proxy] listen changes need a restart; still listening on {listen}",
                     listen=", ".join(self.config.proxy.listen))
        if config.proxy.workers != self.config.proxy.workers and (self.is_master or self.role is not None):
            log.warn("reload: [proxy] workers changes need a restart; still {n}", n=self.config.proxy.workers)
        old_map = self.config.map
        for what, now, then in (("[log]", config.log, self.config.log), ("[metrics]", config.metrics, self.config.metrics),
                                 ("[map] store", config.map.store, old_map.store),
                                 # placements, holds and journal entries are keyed by the user and mailbox names these
                                 # make: changed under them, they would name other users and mailboxes (probe r2)
                                 ("[map] username_format", config.map.username_format, old_map.username_format),
                                 ("[map] separator", config.map.separator, old_map.separator)):
            if now != then:  # read once, at start-up: the running values are kept
                log.warn("reload: {what} changes need a restart; still {then}", what=what, then=str(then))
        config = keep_restart_only(config, self.config)
        if (config.map.rules, config.map.default) != (self.config.map.rules, self.config.map.default) and self.role is None:
            log.warn("reload: the map rules changed; no mail moves with them: a mailbox now routed elsewhere looks "
                     "empty or gone until its mail is moved (`referral-proxy move`); sessions whose home or selected "
                     "mailbox they route elsewhere are told BYE")  # (probe 3, stop 48)
        repointed = any(b in config.backends and config.backends[b].endpoint != c.endpoint
                        for b, c in self.config.backends.items())
        self.context.reload(config)
        self.config = config
        if repointed:
            self.relocation.reloaded()  # sessions connected to an old endpoint are told BYE (relocation.moved)
        if self.health is not None:
            self.health.reload(config.backends)
        if self.workers is not None:
            self.workers.reload()  # each worker reads the file again itself
            log.info("reloaded map rules from {path}; workers told to reload", path=path)
            return
        log.info("reloaded backends and map rules from {path}; [proxy] limits and referrals apply to new sessions",
                 path=path)

    def _master_gone(self) -> None:
        if not self.running:  # this worker is stopping anyway (the reactor drops every reader)
            return
        log.warn("worker {index}: the master process is gone; stopping", index=self.role.index if self.role else "?")
        self.reactor.stop()
