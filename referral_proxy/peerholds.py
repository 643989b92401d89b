"""Between separate proxies on one SQLite map file (one host, not one master's workers): a RENAME on
one backend also holds the other proxies' sessions of its user there.

renamehold.py holds the user's other sessions of the RENAME's own process, workerholds.py those of
the other workers of its master, proxyappends.py those of the other proxies on a PostgreSQL map.
Separate proxies on one SQLite file read nothing of each other's RENAMEs: Dovecot then carries a
uidlist lock a STATUS of the other proxy holds along to the new name, where nobody frees it
(tests/test_rename_stale_lock.py, ``..._on_one_sqlite_file``: 15 of 16 STATUS rounds left a live lock).

So each proxy (a single process, or the master of workers) listens on an abstract Unix socket named
after the map file and its process id (:func:`address`: no file to leave behind, no path length
limit). A RENAME finds the others' in /proc/net/unix (:func:`listening`), connects to each and sends
one JSON line; each holds its sessions (a master: its workers', through its relay) and answers
"held". The RENAME waits for every answer at most workerholds.ASK_WAIT, then goes on regardless
(logged). Closing the connection ends the hold (a killed RENAME's process ends it too); a hold lasts
at most REMOTE_HOLD. Only processes of root, this process's user or the map file's owner are served
or asked (SO_PEERCRED: an abstract socket has no file permissions).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from .renamehold import REMOTE_HOLD
from .turns import Release
from .workerholds import ASK_WAIT, Lines, encode

__all__ = ["PREFIX", "MapFile", "map_file", "address", "listening", "PeerHolds", "listen"]

log = Logger()

PREFIX = "referral-proxy-holds"
UNIX_TABLE = "/proc/net/unix"
HoldHere = Callable[[str, str], Awaitable[Release]]


@dataclass(frozen=True)
class MapFile:
    """The SQLite map file proxies share: the name their sockets bear, and the user ids trusted at the other
    end of one (root, this process's, the file's owner: a proxy run as the mail user, `move` run as root)."""

    key: str
    uids: frozenset[int]


def map_file(spec: str | None) -> MapFile | None:
    """The map file of the store *spec* (its real path, hashed); None for another store."""
    if spec is None or not spec.startswith("sqlite:") or spec == "sqlite::memory:":
        return None
    path = os.path.realpath(spec.partition(":")[2])
    uids = {0, os.getuid()}
    try:
        uids.add(os.stat(path).st_uid)
    except OSError:
        pass  # (not made yet: this process makes it)
    return MapFile(hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:24], frozenset(uids))


def address(key: str, pid: int) -> str:
    """The abstract socket the proxy *pid* on the map file *key* listens on."""
    return f"\0{PREFIX}/{key}/{pid}"


def listening(key: str, own: int, table: str | Path = UNIX_TABLE) -> list[str]:
    """The addresses of the proxies on the map file *key* listening now, but *own*'s."""
    prefix, found = f"@{PREFIX}/{key}/", set()
    try:
        text = Path(table).read_text("utf-8", "surrogateescape")
    except OSError:
        return []
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)  # (a connection it accepted bears its name too: one address)
        if len(fields) < 8 or not fields[7].startswith(prefix):
            continue
        pid = fields[7][len(prefix):]
        if pid.isdigit() and int(pid) != own:
            found.add(address(key, int(pid)))
    return sorted(found)


def _trusted(transport: Any, uids: frozenset[int]) -> bool:
    """The process at the other end runs as one of *uids* (SO_PEERCRED; True without a socket)."""
    sock = getattr(transport, "socket", None)
    if sock is None:
        return True
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid in uids:
        return True
    log.warn("peer hold: the other end runs as user id {uid}: not one of ours", uid=uid)
    return False


class _Ask(protocol.Protocol):
    """One other proxy asked to hold: ``held`` fires True once it says so, False if it goes away first."""

    transport: Any  # (a Twisted transport: zope interfaces, which mypy cannot follow)

    def __init__(self, line: bytes, uids: frozenset[int]) -> None:
        self.line, self.uids = line, uids
        self.held: defer.Deferred[bool] = defer.Deferred()
        self._lines = Lines("peer hold")

    def connectionMade(self) -> None:
        if not _trusted(self.transport, self.uids):  # (another user's socket under our name: not waited for)
            self.transport.loseConnection()
            self.gone()
            return
        self.transport.write(self.line)

    def dataReceived(self, data: bytes) -> None:
        if any("held" in m for m in self._lines.feed(data)) and not self.held.called:
            self.held.callback(True)

    def connectionLost(self, reason: Any = None) -> None:
        self.gone()

    def gone(self) -> None:
        if not self.held.called:
            self.held.callback(False)

    def end(self) -> None:
        """The hold ends: the other proxy hears it now (shut down here, not at the reactor's next turn: this
        process may stall right after, a journal write on a slow disk, and hold its sessions meanwhile)."""
        if self.transport is None:
            return
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.transport.loseConnection()


class _Once(protocol.Factory):
    """One connection's factory (quiet: one per asked proxy and RENAME)."""

    noisy = False

    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.proto


class PeerHolds:
    """A RENAME's side: the other proxies on the map file hold their sessions of its user."""

    def __init__(self, where: MapFile, reactor: Any, table: str | Path = UNIX_TABLE) -> None:
        self.where, self.reactor, self.table = where, reactor, table
        self._ids = (f"{os.getpid()}.{n}" for n in itertools.count(1))

    async def hold(self, backend: str, user: str) -> Release:
        """Every other proxy's sessions of *user* hold their connections to *backend* (or ASK_WAIT
        passed); the release lets them go."""
        peers = listening(self.where.key, os.getpid(), self.table)
        if not peers:
            return _nothing
        line = encode({"hold": next(self._ids), "backend": backend, "user": user})
        asks = [_Ask(line, self.where.uids) for _ in peers]
        connects = [endpoints.UNIXClientEndpoint(self.reactor, peer, timeout=ASK_WAIT).connect(_Once(ask))
                    for peer, ask in zip(peers, asks)]
        for connect, ask in zip(connects, asks):
            connect.addErrback(lambda _f, ask=ask: ask.gone())  # (refused: it died meanwhile)

        def release() -> None:
            for connect, ask in zip(connects, asks):
                connect.cancel()
                ask.end()

        done: defer.Deferred[None] = defer.Deferred()
        answers: list[bool] = []

        def answered(ok: bool) -> None:
            answers.append(ok)
            if len(answers) == len(asks) and not done.called:
                done.callback(None)

        for ask in asks:
            ask.held.addCallback(answered)

        def give_up() -> None:
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(ASK_WAIT, give_up)
        try:
            await done
        except BaseException:
            release()
            raise
        finally:
            if timer.active():
                timer.cancel()
        if len(answers) < len(asks):
            log.warn("RENAME on {backend} for {user}: the other proxies on the map file did not all hold within "
                     "{s} s; renaming regardless", backend=backend, user=user, s=ASK_WAIT)
        elif not all(answers):
            log.info("RENAME on {backend} for {user}: {n} other proxy(ies) went away before holding",
                     backend=backend, user=user, n=answers.count(False))
        return release


def _nothing() -> None:
    pass


class _Serve(protocol.Protocol):
    """Another proxy's RENAME: this proxy's sessions of its user hold until the connection closes."""

    transport: Any

    def __init__(self, hold_here: HoldHere, reactor: Any, uids: frozenset[int]) -> None:
        self.hold_here, self.reactor, self.uids = hold_here, reactor, uids
        self._lines = Lines("peer hold")
        self._asked = self._gone = False
        self._release: Release | None = None
        self._bound: Any = None

    def connectionMade(self) -> None:
        if not _trusted(self.transport, self.uids):
            self.transport.loseConnection()
            self._gone = True

    def dataReceived(self, data: bytes) -> None:
        for message in self._lines.feed(data):
            if self._asked or self._gone or "hold" not in message:
                continue
            self._asked = True
            d = defer.ensureDeferred(self._hold(str(message["hold"]), str(message.get("backend")),
                                                str(message.get("user"))))
            d.addErrback(lambda f: log.failure("holding for another proxy's RENAME", f))

    async def _hold(self, ident: str, backend: str, user: str) -> None:
        try:
            release = await self.hold_here(backend, user)
        except BaseException:
            self.transport.loseConnection()  # (the asker goes on at once)
            raise
        if self._gone:  # ended while the commands in flight were waited for
            release()
            return
        self._release = release
        self._bound = self.reactor.callLater(REMOTE_HOLD, self._too_long, ident)
        self.transport.write(encode({"held": ident}))

    def _too_long(self, ident: str) -> None:
        log.warn("another proxy's RENAME ({ident}) not over after {s} s; its user's sessions here go on",
                 ident=ident, s=REMOTE_HOLD)
        self._end()
        self.transport.loseConnection()

    def _end(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        if self._bound is not None and self._bound.active():
            self._bound.cancel()

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        self._end()


def listen(where: MapFile, reactor: Any, hold_here: HoldHere) -> Any:
    """This proxy's socket for the others' RENAMEs (the listening port: stopListening at the end)."""
    return reactor.listenUNIX(address(where.key, os.getpid()), RenameHoldsFactory(hold_here, reactor, where.uids))


class RenameHoldsFactory(protocol.Factory):
    """The other proxies' RENAMEs, one connection each (named in the log line of its socket)."""

    noisy = False

    def __init__(self, hold_here: HoldHere, reactor: Any, uids: frozenset[int]) -> None:
        self.hold_here, self.reactor, self.uids = hold_here, reactor, uids

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return _Serve(self.hold_here, self.reactor, self.uids)
