"""Which owners of journal entries in a shared SQLite map still run: each holds a lock while it lives.

An owner's pid tells nothing outside its host name and PID namespace (journal.owner_gone): a proxy in a
container beside another, or one whose host name changed, left its entries held for good on a map without
leases (probe v5 of stop 52). Every process that opens the file takes ``flock`` on a file of its own in
``<map>.owners/`` and keeps it until it exits; the kernel lets go when it dies, even by SIGKILL, and a
stopped process keeps it. So an owner whose file another process can lock no longer runs, wherever it ran
on this machine. (Unlike ``fcntl`` locks, ``flock`` ones hold across PID namespaces on one file system.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

__all__ = ["LifeLocks", "alive"]

_HELD: dict[tuple[str, str], list[int]] = {}  # (directory, owner) -> [the descriptor holding the lock, its holders]


def alive(owner: str) -> bool | None:
    """Whether *owner* runs, by its lock in one of the owners' directories this process uses; None: it has
    no file there (another store, an older version: its pid is looked at)."""
    for directory in {d for d, _ in _HELD}:
        try:
            return not LifeLocks._unlocked(Path(directory) / _name(owner))
        except OSError:
            continue
    return None


def _name(owner: str) -> str:
    return hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class LifeLocks:
    """The owners' lock files of one map file."""

    def __init__(self, map_path: str | Path) -> None:
        self.directory = Path(os.path.realpath(map_path) + ".owners")  # one for every spelling of the path

    def hold(self, owner: str) -> None:
        """Take *owner*'s lock (this process's) for as long as it runs; once per process and map.
        The file is locked under another name and then renamed into place: no reader ever finds it
        unlocked while its owner lives."""
        key = (str(self.directory), owner)
        if key in _HELD:
            _HELD[key][1] += 1
            return
        self.directory.mkdir(mode=0o700, exist_ok=True)
        final = self.directory / _name(owner)
        partial = self.directory / f".{final.name}.{os.getpid()}"
        fd = os.open(partial, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, owner.encode("utf-8", "surrogateescape") + b"\n")
            os.replace(partial, final)
        except OSError:
            os.close(fd)
            raise
        _HELD[key] = [fd, 1]

    def release(self, owner: str) -> None:
        """One holder of this process's lock is done (a store closed); the last one lets it go."""
        key = (str(self.directory), owner)
        held = _HELD.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])

    def dead(self, owner: str) -> bool:
        """True if *owner* held its lock here and no longer does: it stopped running. False while it
        runs, and for an owner with no file (written by an older version: journal.owner_gone decides)."""
        if (str(self.directory), owner) in _HELD:
            return False
        try:
            return self._unlocked(self.directory / _name(owner))
        except OSError:  # no file
            return False

    def sweep(self, owners: set[str]) -> None:
        """Remove the files of dead owners that own none of *owners*' entries any more (the journal's
        owners, read before this), and pieces a process left half made an hour ago or more."""
        keep = {_name(o) for o in owners}
        try:
            files = list(self.directory.iterdir())
        except OSError:
            return
        for path in files:
            try:
                if path.name.startswith("."):
                    if time.time() - path.stat().st_mtime > 3600:
                        path.unlink()
                elif path.name not in keep and self._unlocked(path):
                    path.unlink()
            except OSError:
                pass

    @staticmethod
    def _unlocked(path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
