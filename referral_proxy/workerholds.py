"""Between the workers of one master: a RENAME on one backend also holds the other workers'
sessions of its user there, relayed by the master.

renamehold.py holds, right before such a RENAME, the connections to its backend of the user's
other sessions in its own process (Dovecot would carry a uidlist lock one of their commands holds
along to the new name, where nobody ever frees it); on a PostgreSQL map each other proxy's
listener reads the RENAME's journal entry and holds its own (proxyappends.py). Workers on a
SQLite map read nothing of each other's RENAMEs (tests/test_rename_stale_lock.py,
``..._at_another_worker``: 12 of 16 STATUS rounds and 16 of 16 SELECT rounds left a live lock).

So the worker's RENAME asks its master (:meth:`WorkerHolds.hold`), the master asks every other live
worker, each holds its sessions' connections of that user to that backend
(renamehold.hold_for_another: once their commands in flight are answered, at most REMOTE_QUIET) and
says so; the master says "go" to the asker once every live worker has (one that dies meanwhile is
not waited for). The RENAME waits for that at most ASK_WAIT, then goes on regardless (logged). Its
end is relayed the same way; a hold lasts at most REMOTE_HOLD (the master relays the end of a
worker that died, a worker started meanwhile is told the holds under way). A move the master
recovers (its RENAME aside) asks the workers the same way, at the master's own relay.

One JSON object per line: the master's over each worker's stdin (whose end also tells a worker its
master is gone), the workers' over a pipe of their own (``CHANNEL_ENV`` names its descriptor).
"""

from __future__ import annotations

import itertools
import json
import os
import select
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from .renamehold import REMOTE_HOLD, REMOTE_QUIET, hold_for_another
from .turns import Release

__all__ = ["CHANNEL_ENV", "ASK_WAIT", "MASTER", "PEER", "Lines", "encode", "HoldRelay", "WorkerHolds",
           "from_environment"]

log = Logger()

CHANNEL_ENV = "REFERRAL_PROXY_CHANNEL"  # the descriptor a worker writes its lines to the master on
#: Seconds a RENAME waits for the other workers' holds (each waits REMOTE_QUIET at most).
ASK_WAIT = REMOTE_QUIET + 2.0
MAX_LINE = 64 * 1024  # a longer line is not one of ours: dropped
MASTER = -1  # the master's own index at its relay: a move it recovers asks the workers too
PEER = -2  # the index of the holds the master serves for other proxies' RENAMEs (peerholds.py): never asked back
_PEERS = -3  # (in a hold's waiting set: the other proxies on the map file, asked by the relay)


def encode(message: dict[str, Any]) -> bytes:
    """One line (names in any bytes: lone surrogates travel as JSON escapes)."""
    return json.dumps(message, ensure_ascii=True).encode("ascii") + b"\n"


class Lines:
    """Whole lines out of a byte stream (*what* names it in the log)."""

    def __init__(self, what: str = "worker channel") -> None:
        self.what = what
        self._partial = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
        out = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.warn("{what}: not a message: {line!r}", what=self.what, line=line[:200])
                continue
            if isinstance(message, dict):
                out.append(message)
        return out


Ref = tuple[int, str]  # (the asking worker's index, its id for the hold)


def _ref(value: Any) -> Ref:
    """A hold's reference as a message carries it: [index, id]."""
    return int(value[0]), str(value[1])


class HoldRelay:
    """The master's side: a worker's RENAME is held by every other live worker before it goes on."""

    def __init__(self, send: Callable[[int, bytes], None], live: Callable[[], Iterable[int]],
                 peers: Callable[[str, str], Coroutine[Any, Any, Release]] | None = None) -> None:
        self.send, self.live = send, live  # send(worker index, line); the indices of the live workers
        self.peers = peers  # the other proxies on a SQLite map file hold too (peerholds.PeerHolds.hold)
        self.active: dict[Ref, tuple[str, str]] = {}  # hold -> (backend, user), until its end
        self.waiting: dict[Ref, set[int]] = {}  # hold -> the workers (and _PEERS) yet to say they hold
        self._peer_releases: dict[Ref, Release] = {}
        self._lines: dict[int, Lines] = {}

    def started(self, index: int) -> None:
        """A worker (re)started: the holds under way hold it too (it says so; nobody waits for it)."""
        self._lines[index] = Lines()
        for ref, (backend, user) in self.active.items():
            if ref[0] != index:
                self.send(index, encode({"hold": list(ref), "backend": backend, "user": user}))

    def received(self, index: int, data: bytes) -> None:
        for message in self._lines.setdefault(index, Lines()).feed(data):
            try:
                self._message(index, message)
            except (KeyError, IndexError, TypeError, ValueError):
                log.warn("worker channel: a malformed message from worker {i}: {m!r}", i=index, m=message)

    def _message(self, index: int, message: dict[str, Any]) -> None:
        if "hold" in message:
            ref = (index, str(message["hold"]))
            backend, user = str(message.get("backend")), str(message.get("user"))
            self.active[ref] = (backend, user)
            others = set(self.live()) - {index}
            asks_peers = self.peers is not None and index != PEER
            self.waiting[ref] = others | ({_PEERS} if asks_peers else set())
            for other in sorted(others):  # (a copy: an answer may come back within send)
                self.send(other, encode({"hold": list(ref), "backend": backend, "user": user}))
            if asks_peers:
                self._ask_peers(ref, backend, user)
            self._maybe_go(ref)
        elif "held" in message:
            ref = _ref(message["held"])
            if ref in self.waiting:
                self.waiting[ref].discard(index)
                self._maybe_go(ref)
        elif "end" in message:
            self._end((index, str(message["end"])))

    def _ask_peers(self, ref: Ref, backend: str, user: str) -> None:
        assert self.peers is not None
        d: defer.Deferred[Any] = defer.ensureDeferred(self.peers(backend, user))

        def held(release: Release) -> None:
            if ref in self.active:
                self._peer_releases[ref] = release
            else:  # ended meanwhile
                release()

        def answered(_: object) -> None:
            if ref in self.waiting:
                self.waiting[ref].discard(_PEERS)
                self._maybe_go(ref)

        d.addCallback(held)
        d.addErrback(lambda f: log.failure("asking the other proxies to hold", f))
        d.addCallback(answered)

    def _maybe_go(self, ref: Ref) -> None:
        if ref in self.waiting and not self.waiting[ref]:
            del self.waiting[ref]
            self.send(ref[0], encode({"go": ref[1]}))

    def _end(self, ref: Ref) -> None:
        self.waiting.pop(ref, None)
        release = self._peer_releases.pop(ref, None)
        if release is not None:
            release()
        if self.active.pop(ref, None) is not None:
            for other in set(self.live()) - {ref[0]}:
                self.send(other, encode({"end": list(ref)}))

    def ended(self, index: int) -> None:
        """A worker died: its holds end, and nobody waits for it to hold."""
        self._lines.pop(index, None)
        for ref in [r for r in self.active if r[0] == index]:
            self._end(ref)
        for ref in list(self.waiting):
            if ref in self.waiting:
                self.waiting[ref].discard(index)
                self._maybe_go(ref)


class WorkerHolds:
    """A worker's side: asks for the other workers' holds (a RENAME here), holds for theirs."""

    def __init__(self, ctx: Any, write: Callable[[bytes], None]) -> None:
        self.ctx, self.write = ctx, write
        self._ids = (f"{os.getpid()}.{n}" for n in itertools.count(1))  # never reused by a restarted worker
        self._go: dict[str, defer.Deferred[bool]] = {}
        self._holding: dict[Ref, Release | None] = {}  # another worker's RENAME: its release (None: being held)
        self._lines = Lines()

    async def hold(self, backend: str, user: str) -> Release:
        """The other workers' sessions of *user* hold their connections to *backend* (or ASK_WAIT
        passed); the release lets them go."""
        ident = next(self._ids)
        went: defer.Deferred[bool] = defer.Deferred()
        self._go[ident] = went
        def give_up() -> None:
            if not went.called:
                went.callback(False)

        timer = self.ctx.reactor.callLater(ASK_WAIT, give_up)
        ended = False

        def release() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.write(encode({"end": ident}))

        try:
            self.write(encode({"hold": ident, "backend": backend, "user": user}))
            if not await went:
                log.warn("RENAME on {backend} for {user}: the other workers did not all hold within {s} s; "
                         "renaming regardless", backend=backend, user=user, s=ASK_WAIT)
        except BaseException:
            release()
            raise
        finally:
            self._go.pop(ident, None)
            if timer.active():
                timer.cancel()
        return release

    def received(self, data: bytes) -> None:
        """Bytes from the master."""
        for message in self._lines.feed(data):
            try:
                self._message(message)
            except (KeyError, IndexError, TypeError, ValueError):
                log.warn("worker channel: a malformed message from the master: {m!r}", m=message)

    def _message(self, message: dict[str, Any]) -> None:
        if "go" in message:
            went = self._go.get(str(message["go"]))
            if went is not None and not went.called:
                went.callback(True)
        elif "hold" in message:
            ref = _ref(message["hold"])
            d = defer.ensureDeferred(self._hold_for(ref, str(message.get("backend")), str(message.get("user"))))
            d.addErrback(lambda f: log.failure("holding for another worker's RENAME", f))
        elif "end" in message:
            self._end(_ref(message["end"]))

    async def _hold_for(self, ref: Ref, backend: str, user: str) -> None:
        if ref in self._holding:
            return
        self._holding[ref] = None
        release = await hold_for_another(self.ctx, backend, user)
        if ref not in self._holding:  # ended while its commands in flight were waited for
            release()
            return
        self._holding[ref] = release
        self.write(encode({"held": list(ref)}))
        self.ctx.reactor.callLater(REMOTE_HOLD, self._end, ref, True)

    def _end(self, ref: Ref, bound: bool = False) -> None:
        if ref not in self._holding:
            return
        release = self._holding.pop(ref)
        if bound:
            log.warn("another worker's RENAME ({ref}) not over after {s} s; its user's sessions here go on",
                     ref=ref[1], s=REMOTE_HOLD)
        if release is not None:
            release()


def from_environment(ctx: Any) -> WorkerHolds | None:
    """A worker's channel to its master, if the master gave it one."""
    fd = os.environ.get(CHANNEL_ENV)
    if not fd or not fd.isdigit():
        return None
    channel = int(fd)
    os.set_blocking(channel, False)

    def write(line: bytes) -> None:
        if len(line) > select.PIPE_BUF:  # (a user name of kilobytes) written whole or not at all
            log.warn("worker channel: a RENAME hold message of {n} bytes not sent (its bound ends it)", n=len(line))
            return
        try:
            os.write(channel, line)  # (at most PIPE_BUF bytes: a pipe takes them whole, or not at all)
        except BlockingIOError:
            log.warn("worker channel to the master full: a RENAME hold message dropped (its bound ends it)")
        except OSError:
            pass  # the master is gone: this worker stops (workers.watch_master)

    return WorkerHolds(ctx, write)
