"""One relayed MOVE of a mailbox at a time across the workers of one master ([proxy] workers = N).

turns.py orders the MOVEs of one process; two sessions on two workers MOVEing one message at once
still both succeeded at Dovecot (the message in both destinations: 9 to 14 of 30 rounds,
tests/test_move_workers_turn.py). The master makes a directory and names it to its workers
(``ENV``); a worker holds an exclusive ``flock`` on a file named by the mailbox while its MOVE runs.
The kernel drops a dead worker's locks, so a worker killed mid-MOVE holds nobody. Taken without
blocking the reactor: tried again every few milliseconds while another worker holds it.

A mailbox move (mover.py) takes the same turn of each source for its drain's MOVE and its RENAME
aside (appendturns.mover_turn), in a proxy, in ``referral-proxy move`` and in ``recover`` (Standalone): on a SQLite map the
lock files live beside the map file (beside_store), on PostgreSQL they are its advisory locks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet import task

from . import peerholds
from .routing import MailboxMap, normalize
from .turns import Release, Turns

__all__ = ["ENV", "FileTurns", "make_directory", "remove_directory", "from_environment", "from_store", "beside_store",
           "Standalone", "mailbox_turn", "mailbox_turns"]

ENV = "REFERRAL_PROXY_TURNS"  # the directory of the lock files, set by the master for its workers
POLL = 0.005  # seconds between tries while another worker holds the lock
IDLE_FILES = 64  # lock files of APPENDs' keys kept open, unlocked, for the next APPEND there


def make_directory() -> str:
    """The master's: a private directory its workers share (removed by remove_directory at its stop)."""
    return tempfile.mkdtemp(prefix="referral-proxy-turns-")


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class FileTurns:
    """An exclusive lock per key, between processes: ``take`` fires with the function that frees it.

    A key's file is removed by the last holder (under LOCK_EX, checked to be still the one its name
    gives): the directory holds the files of keys held now and of at most IDLE_FILES more a
    process keeps open, never one per mailbox ever used. So a lock is only had once the file
    locked is still the one the name gives (removed meanwhile: a new one is opened and locked)."""

    def __init__(self, directory: str | Path, reactor: Any) -> None:
        self.directory, self.reactor = Path(directory), reactor
        self._shared: dict[Hashable, list[int]] = {}  # key -> [its open file, shared holders here]
        self._idle: dict[Hashable, int] = {}  # files of keys no one here holds, kept open

    def _path(self, key: Hashable) -> Path:
        return self.directory / hashlib.sha256(repr(key).encode("utf-8", "surrogateescape")).hexdigest()[:32]

    async def take(self, key: Hashable, mode: int = fcntl.LOCK_EX) -> Release:
        """The lock (exclusive; *mode* LOCK_SH: shared with other shared holders), once it is free."""
        path = self._path(key)
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await task.deferLater(self.reactor, POLL, lambda: None)
                if _current(fd, path):
                    return _closer(fd, path)
            except BaseException:  # cancelled (the session ended while it waited), or the directory is gone
                os.close(fd)
                raise
            os.close(fd)  # its last holder removed it meanwhile: the name's new file is the lock

    def try_share(self, key: Hashable) -> Release | None:
        """The lock held shared at once, or None while another process holds it exclusive. Every
        APPEND's, with workers: the shared holders of a key in this process hold one flock, on a
        file kept open (IDLE_FILES of them once unlocked); its release is called once."""
        held = self._shared.get(key)
        if held is None:
            path = self._path(key)
            fd = self._idle.pop(key, None)
            for _ in range(3):
                try:
                    if fd is None:
                        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    if fd is not None:
                        self._park(key, fd)
                    return None
                if _current(fd, path):
                    break
                os.close(fd)  # removed by its last holder elsewhere since it was parked here
                fd = None
            else:
                return None
            held = self._shared[key] = [fd, 0]
        held[1] += 1
        return functools.partial(self._unshare, key)

    def _unshare(self, key: Hashable) -> None:
        held = self._shared[key]
        held[1] -= 1
        if not held[1]:
            del self._shared[key]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            self._park(key, held[0])

    def _park(self, key: Hashable, fd: int) -> None:
        """Keep an unlocked file open for the next APPEND there; past IDLE_FILES, close it (and
        remove it if nobody holds it)."""
        if len(self._idle) >= IDLE_FILES:
            _drop(fd, self._path(key))
        else:
            self._idle[key] = fd

    async def share(self, key: Hashable) -> Release:
        return await self.take(key, fcntl.LOCK_SH)

    def close(self) -> None:
        """At the process's stop: the files kept open for the next APPEND are let go, each removed if
        nobody else holds it (else the directory kept IDLE_FILES more after every restart; probe 8,
        stop 48). A turn still held keeps its file until its holder ends it."""
        idle, self._idle = self._idle, {}
        for key, fd in idle.items():
            _drop(fd, self._path(key))


def _current(fd: int, path: Path) -> bool:
    """*fd* is the file *path* names (not one its last holder removed)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _drop(fd: int, path: Path) -> None:
    """Close *fd*, first removing its file if nobody else holds it (LOCK_EX had at once) and the name
    still gives it: a holder elsewhere keeps it, and the next one to let go removes it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _current(fd, path):
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)  # (closing drops the flock)


def _closer(fd: int, path: Path) -> Release:
    freed = False

    def release() -> None:
        nonlocal freed
        if not freed:
            freed = True
            _drop(fd, path)

    return release


def from_environment(reactor: Any) -> FileTurns | None:
    """A worker's shared turns, if its master made them (None: a single process; turns.py suffices)."""
    directory = os.environ.get(ENV)
    return FileTurns(directory, reactor) if directory and os.path.isdir(directory) else None


def from_store(spec: str | None, reactor: Any) -> Any:
    """The turns between proxies on one PostgreSQL map (pgturns.PgTurns), or None (another store:
    one host; a master's workers have crossturns)."""
    if spec is None or spec.partition(":")[0] not in ("postgresql", "postgres"):
        return None
    from .pgturns import PgTurns  # psycopg only where it is used

    return PgTurns(spec, reactor)


def beside_store(spec: str | None, reactor: Any) -> FileTurns | None:
    """The turns of every process on one SQLite map file (one host): lock files in ``FILE.turns/``
    beside it, where the admin ``move`` and ``recover`` find them too (the workers' directory is
    the master's own). None for another store (or one in memory)."""
    if spec is None or not spec.startswith("sqlite:") or spec == "sqlite::memory:":
        return None
    directory = Path(spec.partition(":")[2] + ".turns")
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None  # (the store says why when it opens)
    return FileTurns(directory, reactor)


@dataclasses.dataclass
class Standalone:
    """The turns of a process that serves no session (``referral-proxy move``, ``recover``): the
    running proxies' on the same map store, as a ProxyContext carries them."""

    mailbox_map: MailboxMap
    worker_turns: FileTurns | None
    proxy_turns: Any
    move_turns: Turns = dataclasses.field(default_factory=Turns)
    reactor: Any = None
    sessions: tuple[Any, ...] = ()  # none: no APPEND of this process is ever under way
    worker_holds: Any = None  # its RENAME aside holds the proxies' sessions on the SQLite map file (peerholds.py)

    @classmethod
    def of(cls, mailbox_map: MailboxMap, spec: str | None, reactor: Any) -> Standalone:
        where = peerholds.map_file(spec)
        return cls(mailbox_map, beside_store(spec, reactor), from_store(spec, reactor), reactor=reactor,
                   worker_holds=peerholds.PeerHolds(where, reactor) if where else None)


async def _in_order(takes: Iterable[Callable[[], Awaitable[Release]]]) -> Release:
    """Each turn after the one before; one release frees them all (the last first)."""
    held: list[Release] = []

    def release() -> None:
        while held:
            held.pop()()

    try:
        for take in takes:
            held.append(await take())
    except BaseException:  # cancelled (the session ended while it waited)
        release()
        raise
    return release


async def mailbox_turn(ctx: Any, backend: str, user: str, mailbox: bytes) -> Release:
    """The turn of *mailbox* on *backend*: this process's (ctx.move_turns), then, under a master, the
    workers' (ctx.worker_turns), then that of the proxies on one PostgreSQL map (ctx.proxy_turns).
    Taken by a relayed MOVE out of the mailbox and by a RENAME of it on one backend (Dovecot's MOVE
    copies, then expunges: a RENAME between left both copies)."""
    mailbox_map: MailboxMap = ctx.mailbox_map
    key = (backend, mailbox_map.canonical(user),
           normalize(mailbox.decode("utf-8", "surrogateescape"), mailbox_map.separator))
    turns = [t for t in (ctx.move_turns, ctx.worker_turns, ctx.proxy_turns) if t is not None]
    return await _in_order(functools.partial(t.take, key) for t in turns)


async def mailbox_turns(ctx: Any, backend: str, user: str, mailboxes: list[bytes]) -> Release:
    """The turns of several mailboxes (a RENAME's and its children's: Dovecot renames them along),
    taken in one order (two RENAMEs wait for each other, never each for the other)."""
    mailbox_map: MailboxMap = ctx.mailbox_map
    names = sorted({normalize(m.decode("utf-8", "surrogateescape"), mailbox_map.separator): m
                    for m in mailboxes}.items())
    return await _in_order(functools.partial(mailbox_turn, ctx, backend, user, m) for _name, m in names)
