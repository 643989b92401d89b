"""The mailbox map: which backend(s) own a user's mailbox.

Order of authority: a placement written at run time (a moved mailbox) > the first
matching ``[[map.rules]]`` entry > ``[map].default``. Placements live in a store
(SQLite here) mirrored in memory, so a lookup never waits on I/O.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from .config import MapConfig

__all__ = ["Route", "MailboxMap", "PlacementStore", "SQLiteStore", "MemoryStore", "open_store", "pattern_matches"]


@dataclass(frozen=True)
class Route:
    """Backends holding a mailbox, in preference order (replicas after the primary)."""

    backends: tuple[str, ...]

    @property
    def primary(self) -> str:
        return self.backends[0]


@dataclass
class JournalEntry:
    """A multi-step operation (a mailbox move) in progress, recorded step by step."""

    id: int
    user: str
    op: str
    data: dict
    step: str
    created: float = field(default_factory=time.time)


class PlacementStore(Protocol):
    """Where run-time placements (user, mailbox) -> backends are kept."""

    def load(self) -> dict[tuple[str, str], tuple[str, ...]]: ...
    def changed(self) -> bool:
        """True if another process wrote placements since the last load()."""
    def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None: ...
    def unset(self, user: str, mailbox: str) -> None: ...
    def close(self) -> None: ...
    def journal_begin(self, user: str, op: str, data: dict) -> int: ...
    def journal_step(self, entry_id: int, step: str, data: dict) -> None: ...
    def journal_end(self, entry_id: int) -> None: ...
    def journal(self) -> list[JournalEntry]: ...


class MemoryStore:
    """A store that forgets everything on exit (no ``[map].store`` configured, and tests)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[str, ...]] = {}
        self._journal: dict[int, JournalEntry] = {}
        self._next_id = 1

    def load(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return dict(self._rows)

    def changed(self) -> bool:
        return False

    def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None:
        self._rows[(user, mailbox)] = tuple(backends)

    def unset(self, user: str, mailbox: str) -> None:
        self._rows.pop((user, mailbox), None)

    def close(self) -> None:
        pass

    def journal_begin(self, user: str, op: str, data: dict) -> int:
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._journal[entry_id] = JournalEntry(entry_id, user, op, json.loads(json.dumps(data)), "planned")
        return entry_id

    def journal_step(self, entry_id: int, step: str, data: dict) -> None:
        entry = self._journal[entry_id]
        entry.step, entry.data = step, json.loads(json.dumps(data))

    def journal_end(self, entry_id: int) -> None:
        self._journal.pop(entry_id, None)

    def journal(self) -> list[JournalEntry]:
        return list(self._journal.values())


class SQLiteStore:
    """Placements in an SQLite file; every write is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS placements ("
            " user TEXT NOT NULL, mailbox TEXT NOT NULL, backends TEXT NOT NULL,"
            " PRIMARY KEY (user, mailbox))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS journal ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, op TEXT NOT NULL,"
            " data TEXT NOT NULL, step TEXT NOT NULL, created REAL NOT NULL)"
        )

    def load(self) -> dict[tuple[str, str], tuple[str, ...]]:
        self._version = self._data_version()
        rows = self._db.execute("SELECT user, mailbox, backends FROM placements")
        return {(u, m): tuple(b.split(",")) for u, m, b in rows}

    def _data_version(self) -> int:
        # Changes when ANOTHER connection commits (a local file read, microseconds).
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def changed(self) -> bool:
        return self._data_version() != self._version

    def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO placements (user, mailbox, backends) VALUES (?, ?, ?)",
                (user, mailbox, ",".join(backends)),
            )

    def unset(self, user: str, mailbox: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM placements WHERE user = ? AND mailbox = ?", (user, mailbox))

    def close(self) -> None:
        self._db.close()

    def journal_begin(self, user: str, op: str, data: dict) -> int:
        with self._db:
            cur = self._db.execute(
                "INSERT INTO journal (user, op, data, step, created) VALUES (?, ?, ?, 'planned', ?)",
                (user, op, json.dumps(data), time.time()),
            )
        return int(cur.lastrowid)

    def journal_step(self, entry_id: int, step: str, data: dict) -> None:
        """One transaction per step: a crash leaves the previous step or this one, never half."""
        with self._db:
            self._db.execute("UPDATE journal SET step = ?, data = ? WHERE id = ?", (step, json.dumps(data), entry_id))

    def journal_end(self, entry_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM journal WHERE id = ?", (entry_id,))

    def journal(self) -> list[JournalEntry]:
        rows = self._db.execute("SELECT id, user, op, data, step, created FROM journal ORDER BY id")
        return [JournalEntry(i, u, o, json.loads(d), st, c) for i, u, o, d, st, c in rows]


def open_store(spec: str | None) -> PlacementStore:
    """Open the store named by ``[map].store`` (already made absolute by the config loader)."""
    if spec is None:
        return MemoryStore()
    scheme, _, rest = spec.partition(":")
    if scheme == "sqlite":
        return SQLiteStore(rest)
    raise ValueError(f"unknown store {spec!r}")


@lru_cache(maxsize=1024)
def _compile(pattern: str, separator: str) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "%":
            parts.append(f"[^{re.escape(separator)}]*")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.DOTALL)


def normalize(mailbox: str, separator: str = "/") -> str:
    """INBOX is case-insensitive (RFC 3501 5.1); every other name is compared as sent."""
    head, sep, tail = mailbox.partition(separator)
    if head.upper() == "INBOX":
        return "INBOX" + sep + tail
    return mailbox


def pattern_matches(pattern: str, mailbox: str, separator: str = "/") -> bool:
    """LIST-style match: ``*`` matches anything, ``%`` anything but the separator."""
    return _compile(normalize(pattern, separator), separator).fullmatch(normalize(mailbox, separator)) is not None


class MailboxMap:
    """lookup(user, mailbox) -> Route, from placements, rules and the default."""

    def __init__(self, config: MapConfig, store: PlacementStore | None = None) -> None:
        self.separator = config.separator
        self._store = store if store is not None else MemoryStore()
        self._placements = self._store.load()
        self._moving = self._load_moving()
        self.reconfigure(config)

    def reconfigure(self, config: MapConfig) -> None:
        """Swap in new rules (SIGHUP); placements are kept."""
        self._config = config

    def _refresh(self) -> None:
        """Pick up placements (and moves) written by another process."""
        if self._store.changed():
            self._placements = self._store.load()
            self._moving = self._load_moving()

    def _load_moving(self) -> set[tuple[str, str]]:
        names = set()
        for entry in self._store.journal():
            for old, new in entry.data.get("pairs", []):
                names.add((entry.user, normalize(old, self.separator)))
                names.add((entry.user, normalize(new, self.separator)))
        return names

    def moving(self, user: str, mailbox: str) -> bool:
        """True while a journaled move involves this mailbox (other sessions get NO [INUSE])."""
        self._refresh()
        return (user, normalize(mailbox, self.separator)) in self._moving

    @property
    def store(self) -> PlacementStore:
        return self._store

    def journal_changed(self) -> None:
        """This process wrote the journal: refresh what is moving."""
        self._moving = self._load_moving()

    def lookup(self, user: str, mailbox: str) -> Route:
        self._refresh()
        mailbox = normalize(mailbox, self.separator)
        placed = self._placements.get((user, mailbox))
        if placed:
            return Route(placed)
        for rule in self._config.rules:
            if rule.user is not None and rule.user != user:
                continue
            if rule.mailbox == "*" or pattern_matches(rule.mailbox, mailbox, self.separator):
                return Route(rule.backends)
        return Route((self._config.default,))

    def backends_for(self, user: str) -> list[str]:
        """Primary backends that may own any of *user*'s mailboxes, home first."""
        self._refresh()
        found = [self.home(user).primary]
        for (u, _m), backends in self._placements.items():
            if u == user:
                found.append(backends[0])
        reaches_default = True
        for rule in self._config.rules:
            if rule.user is not None and rule.user != user:
                continue
            found.append(rule.backends[0])
            if rule.mailbox == "*":  # catches everything: later rules and the default are unreachable
                reaches_default = False
                break
        if reaches_default:
            found.append(self._config.default)
        return list(dict.fromkeys(found))

    def home(self, user: str) -> Route:
        """The user's home is the route of INBOX."""
        return self.lookup(user, "INBOX")

    def place(self, user: str, mailbox: str, backends: Iterable[str]) -> None:
        mailbox = normalize(mailbox, self.separator)
        backends = tuple(backends)
        self._store.set(user, mailbox, backends)
        self._placements[(user, mailbox)] = backends

    def unplace(self, user: str, mailbox: str) -> None:
        mailbox = normalize(mailbox, self.separator)
        self._store.unset(user, mailbox)
        self._placements.pop((user, mailbox), None)

    def placements(self, user: str) -> dict[str, tuple[str, ...]]:
        self._refresh()
        return {m: b for (u, m), b in self._placements.items() if u == user}

    def close(self) -> None:
        self._store.close()
