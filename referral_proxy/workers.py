"""``[proxy] workers = N``: N proxy processes sharing the listening sockets, under one master.

The master binds every ``[proxy] listen`` endpoint itself (Twisted's endpoint strings:
interface, backlog, IPv6, ``ssl:``, ``haproxy:`` as configured), never accepts on
them, and starts N workers (``python -m referral_proxy --config FILE``) that inherit
the listening sockets and accept from the kernel's one queue of each. Passing the
sockets rather than SO_REUSEPORT: an idle worker takes the next connection before a
busy one (SO_REUSEPORT spreads by a hash, busy or not), connections waiting in the
queue are never lost when a worker dies (a SO_REUSEPORT socket's queue dies with it),
and the endpoint strings keep their meaning (Twisted's listeners cannot set
SO_REUSEPORT).

Everything the workers must agree on goes through the map store, as between two
proxies: placements, move reservations and the journal. The master alone recovers
moves (at start-up and on its sweep, so also those of a worker that died), forwards
SIGHUP (each worker re-reads the file) and SIGTERM (each says BYE to its clients),
starts a worker again when one dies, and writes the workers' log lines to its own
log. A worker stops when its master is gone (its stdin, a pipe from the master, ends). Over that
pipe and one back the master relays a RENAME's hold to the other workers (workerholds.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet import abstract, defer, error
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from . import crossturns
from .config import ConfigError
from .proxyproto import PREFIX as HAPROXY_PREFIX
from .proxyproto import listen_endpoint
from .workerholds import CHANNEL_ENV, MASTER, PEER, HoldRelay, WorkerHolds

__all__ = ["ACCEPTED", "STARTED", "ENV", "WorkerRole", "worker_role", "WorkerPool", "bind_listeners", "inherited_endpoint",
           "watch_master", "metrics_listen"]

log = Logger()

ACCEPTED = "REFERRAL_PROXY_ACCEPTED_CONFIG"  # the master's running configuration text, for a worker's first load
STARTED = "REFERRAL_PROXY_STARTED_CONFIG"  # the text the master started with: its start-up-only values
ENV = "REFERRAL_PROXY_WORKER"  # "index:count:fd/family,fd/family,...": set by the master for its workers
FIRST_FD = 3  # the listening sockets' descriptors in a worker, in [proxy] listen order
STOP_GRACE = 15.0  # seconds workers get to say BYE and exit before they are killed
QUICK_DEATH = 5.0  # a worker that dies sooner than this after its start is restarted with a growing delay
MAX_DELAY = 30.0


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process was told by its master."""

    index: int  # 0 .. count-1
    count: int
    listeners: tuple[tuple[int, int], ...]  # (file descriptor, address family) per [proxy] listen entry


def worker_role(environ: Any = None) -> WorkerRole | None:
    """This process's role if a master started it, else None (a master, or a single process)."""
    value = (os.environ if environ is None else environ).get(ENV)
    if not value:
        return None
    index, count, fds = value.split(":", 2)
    listeners = tuple((int(fd), int(family)) for fd, family in (item.split("/") for item in fds.split(",") if item))
    return WorkerRole(int(index), int(count), listeners)


def _inner(reactor: Any, spec: str) -> tuple[bool, Any]:
    haproxy = spec.startswith(HAPROXY_PREFIX)
    return haproxy, serverFromString(reactor, spec[len(HAPROXY_PREFIX):] if haproxy else spec)


def check_shareable(reactor: Any, specs: tuple[str, ...]) -> None:
    """Workers share TCP listeners (plain, ``ssl:``, behind ``haproxy:``); refuse anything else."""
    for i, spec in enumerate(specs):
        _, inner = _inner(reactor, spec)
        if type(inner) not in (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint):
            raise ConfigError(f"proxy.listen[{i}]: workers share TCP listeners only (tcp:, tcp6:, ssl:, "
                              f"haproxy:tcp:...), not {spec!r}")


def bind_listeners(reactor: Any, specs: tuple[str, ...], factory: Any, header_timeout: float) -> list[Any]:
    """The master's listening ports, bound now (an address in use raises), never accepting."""
    check_shareable(reactor, specs)
    ports: list[Any] = []
    for spec in specs:
        d = listen_endpoint(reactor, spec, header_timeout).listen(factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise RuntimeError(f"listening on {spec!r} did not complete at once")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        port = result[0]
        port.stopReading()  # the workers accept; the master only holds the socket
        ports.append(port)
    return ports


@implementer(IStreamServerEndpoint)
class _TLSServer:
    """An inherited listener whose connections speak TLS (what ``ssl:`` does on its own port)."""

    def __init__(self, inner: Any, context: Any) -> None:
        self.inner, self.context = inner, context

    def listen(self, factory: Any) -> Any:
        return self.inner.listen(TLSMemoryBIOFactory(self.context, False, factory))


def inherited_endpoint(reactor: Any, spec: str, fd: int, family: int, header_timeout: float,
                       trusted: tuple[str, ...] = ()) -> Any:
    """The server endpoint of one ``[proxy] listen`` entry on the socket the master passed."""
    haproxy, inner = _inner(reactor, spec)
    endpoint: Any = AdoptedStreamServerEndpoint(reactor, fd, family)
    tls = inner._sslContextFactory if isinstance(inner, SSL4ServerEndpoint) else None
    if haproxy:  # haproxy:ssl: reads the header in clear text, then TLS (proxyproto.py)
        return listen_endpoint(reactor, spec, header_timeout, inner=endpoint, tls=tls, trusted=trusted)
    return endpoint if tls is None else _TLSServer(endpoint, tls)


def metrics_listen(spec: str, index: int) -> str:
    """Worker *index*'s ``[metrics] listen``: the configured port plus its index (0 stays 0)."""
    def bump(port: str) -> str:
        return port if int(port) == 0 else str(int(port) + index)

    parts = spec.split(":")
    for i, part in enumerate(parts):
        if part.startswith("port=") and part[5:].isdigit():
            parts[i] = "port=" + bump(part[5:])
            return ":".join(parts)
    if len(parts) > 1 and parts[0] in ("tcp", "tcp6") and parts[1].isdigit():
        parts[1] = bump(parts[1])
    return ":".join(parts)


class _MasterWatch(abstract.FileDescriptor):
    """A worker's end of the pipe from its master: what the master says (workerholds.py); when it
    ends, the master is gone."""

    def __init__(self, reactor: Any, fd: int, on_gone: Any, on_data: Callable[[bytes], None] | None) -> None:
        super().__init__(reactor)
        self._fd, self._on_gone, self._on_data = fd, on_gone, on_data
        self.connected = 1

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data and self._on_data is not None:
            self._on_data(data)
        return None if data else error.ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_gone()


def watch_master(reactor: Any, on_gone: Any, fd: int = 0, on_data: Callable[[bytes], None] | None = None) -> None:
    """Call *on_gone* once the master that started this worker has exited (*on_data* with what it
    writes meanwhile)."""
    os.set_blocking(fd, False)
    reactor.addReader(_MasterWatch(reactor, fd, on_gone, on_data))


class _Worker(ProcessProtocol):
    """One worker process as the master sees it: its log lines, its end."""

    transport: Any  # a Twisted process transport (zope interfaces, which mypy cannot follow)

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool, self.index = pool, index
        self.started = time.monotonic()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = {1: b"", 2: b""}
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == self.pool.channel_fd:
            self.pool.relay.received(self.index, data)
            return
        text = self._partial.get(fd, b"") + data
        lines, _, rest = text.rpartition(b"\n")
        self._partial[fd] = rest
        if lines:
            self.pool.write_log(lines + b"\n")

    def processEnded(self, reason: Failure) -> None:
        for rest in self._partial.values():
            if rest:
                self.pool.write_log(rest + b"\n")
        self._partial = {}
        self.ended.callback(None)
        self.pool.ended(self, reason)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


class WorkerPool:
    """The master's side: starts N workers on the shared sockets, restarts, signals, stops them."""

    def __init__(self, reactor: Any, config_path: str, count: int, ports: list[Any], log_stream: IO[str] | None,
                 on_death: Callable[[], None] | None = None, accepted: Callable[[], str] | None = None,
                 started: str = "") -> None:
        self.reactor, self.config_path, self.count = reactor, config_path, count
        self.accepted = accepted  # the configuration text the master runs now: a worker started runs it too
        self.started = started  # ... with the values of this one read at start-up only (config.keep_restart_only)
        self.on_death = on_death  # called when a worker ended unasked (the master recovers its moves)
        self.log_stream = log_stream  # None: twistd logs (syslog ...): the lines go through the logger
        self._fds = [(port.fileno(), port.socket.family) for port in ports]
        self.workers: dict[int, _Worker] = {}
        self._delay = dict.fromkeys(range(count), 0.0)
        self.stopping = False
        self.turns_dir = crossturns.make_directory()  # the workers' MOVE turns (crossturns.py)
        self.channel_fd = FIRST_FD + len(self._fds)  # a worker's lines to the master (workerholds.py)
        self.relay = HoldRelay(self._send, lambda: list(self.workers))
        self.own_holds: WorkerHolds | None = None  # the master's own asks (holds_for)
        self.peer_holds: WorkerHolds | None = None  # the holds it serves for other proxies' RENAMEs (peerholds.py)

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        fds = ",".join(f"{FIRST_FD + i}/{family}" for i, (_fd, family) in enumerate(self._fds))
        env = dict(os.environ)
        env[ENV] = f"{index}:{self.count}:{fds}"
        env[crossturns.ENV] = self.turns_dir
        package_root = str(Path(__file__).resolve().parent.parent)  # the code this master runs, also for its workers
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, (fd, _family) in enumerate(self._fds):
            child_fds[FIRST_FD + i] = fd
        child_fds[self.channel_fd] = "r"
        env[CHANNEL_ENV] = str(self.channel_fd)
        if self.accepted is not None and (text := self.accepted()):
            env[ACCEPTED] = text
        if self.started:
            env[STARTED] = self.started
        worker = _Worker(self, index)
        argv = [sys.executable, "-m", "referral_proxy", "--config", self.config_path]
        self.reactor.spawnProcess(worker, sys.executable, argv, env=env, childFDs=child_fds)
        self.workers[index] = worker
        self.relay.started(index)
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
            self.relay.ended(worker.index)
        if self.stopping:
            return
        if self.on_death is not None:
            self.on_death()
        lived = time.monotonic() - worker.started
        delay = self._delay[worker.index]
        delay = 0.0 if lived >= QUICK_DEATH else min(MAX_DELAY, max(0.5, delay * 2))
        self._delay[worker.index] = delay
        log.warn("worker {index} (pid {pid}) ended after {lived:.1f}s: {why}; starting it again in {delay}s",
                 index=worker.index, pid=worker.pid, lived=lived, why=reason.getErrorMessage(), delay=delay)
        self.reactor.callLater(delay, self._spawn, worker.index)

    def holds_for(self, ctx: Any, peers: Any = None) -> WorkerHolds:
        """The master's side of a RENAME it runs (a move it recovers): every worker holds for it; with
        *peers* (peerholds.PeerHolds), the other proxies on the SQLite map file too, for the workers'
        RENAMEs as well, and ``peer_holds`` holds the workers for theirs."""
        if peers is not None:
            self.relay.peers = peers.hold
        self.own_holds = WorkerHolds(ctx, lambda line: self.relay.received(MASTER, line))
        self.peer_holds = WorkerHolds(ctx, lambda line: self.relay.received(PEER, line))
        return self.own_holds

    def _send(self, index: int, line: bytes) -> None:
        """A line to worker *index* (over its stdin)."""
        if index in (MASTER, PEER):
            holds = self.own_holds if index == MASTER else self.peer_holds
            if holds is not None:
                holds.received(line)
            return
        worker = self.workers.get(index)
        if worker is not None:
            try:
                worker.transport.writeToChild(0, line)
            except (KeyError, OSError):
                pass  # (its stdin already closed: it is ending)

    def write_log(self, data: bytes) -> None:
        """Whole lines a worker wrote (already formatted by its own log writer)."""
        text = data.decode("utf-8", "backslashreplace")
        if self.log_stream is None:
            for line in text.splitlines():
                log.info("{line}", line=line)
            return
        try:
            self.log_stream.write(text)
            self.log_stream.flush()
        except (OSError, ValueError):
            pass

    def signal_all(self, name: str) -> None:
        for worker in list(self.workers.values()):
            worker.signal(name)

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration file itself."""
        self.signal_all("HUP")

    def stop(self) -> defer.Deferred[Any]:
        """SIGTERM to every worker; fires once all have exited (killed after STOP_GRACE)."""
        self.stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        everyone = defer.DeferredList([w.ended for w in workers])

        def kill() -> None:
            for worker in workers:
                if not worker.ended.called:
                    log.warn("worker {index} (pid {pid}) still running after {s}s: killed", index=worker.index,
                             pid=worker.pid, s=STOP_GRACE)
                    worker.signal("KILL")

        timer = self.reactor.callLater(STOP_GRACE, kill)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            crossturns.remove_directory(self.turns_dir)
            return result

        return everyone.addBoth(done)
