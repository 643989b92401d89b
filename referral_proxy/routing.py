"""The mailbox map: which backend(s) own a user's mailbox, and the moves that hold names.

Order of authority: a placement written at run time (a moved mailbox) > the first
matching ``[[map.rules]]`` entry > ``[map].default``. Placements, the move journal
and its reservations live in a store (SQLite here) mirrored in memory, so a lookup
never waits on I/O. User names are canonical (``[map].username_format``) in every
method of MailboxMap: routing, placements, reservations and the journal agree.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from .config import MapConfig
from .journal import (
    InUse,
    JournalEntry,
    Reservation,
    Step,
    check_transition,
    conflicts,
    covers,
    process_owner,
)

__all__ = ["Route", "MailboxMap", "MapStore", "SQLiteStore", "MemoryStore", "open_store", "pattern_matches",
           "normalize", "canonical_user", "StepHook"]


@dataclass(frozen=True)
class Route:
    """Backends holding a mailbox, in preference order (replicas after the primary)."""

    backends: tuple[str, ...]

    @property
    def primary(self) -> str:
        return self.backends[0]


class MapStore(Protocol):
    """Where run-time placements, the move journal and its reservations are kept.

    The contract a PostgreSQL store must keep too: ``begin_move`` checks the
    reservations of every live entry and writes the new entry with its own in ONE
    transaction (or raises InUse, writing nothing); ``end_move`` removes an entry and
    its reservations in one transaction; ``claim`` is a compare-and-set of the owner."""

    def load(self) -> dict[tuple[str, str], tuple[str, ...]]: ...
    def changed(self) -> bool:
        """True if another process wrote anything since the last load()."""
    def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None: ...
    def unset(self, user: str, mailbox: str) -> None: ...
    def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                   separator: str) -> int: ...
    def journal_step(self, entry_id: int, step: Step, data: dict) -> None: ...
    def end_move(self, entry_id: int) -> None: ...
    def claim(self, entry_id: int, owner: str | None, expected: str | None) -> bool: ...
    def journal(self) -> list[JournalEntry]: ...
    def reservations(self) -> list[tuple[str, Reservation]]: ...
    def close(self) -> None: ...


def _step(value: str) -> Step | None:
    try:
        return Step(value)
    except ValueError:
        return None  # written by an older version: recovery reports it, never guesses


class MemoryStore:
    """A store that forgets everything on exit (no ``[map].store`` configured, and tests)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[str, ...]] = {}
        self._journal: dict[int, JournalEntry] = {}
        self._held: dict[int, list[Reservation]] = {}
        self._next_id = 1

    def load(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return dict(self._rows)

    def changed(self) -> bool:
        return False

    def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None:
        self._rows[(user, mailbox)] = tuple(backends)

    def unset(self, user: str, mailbox: str) -> None:
        self._rows.pop((user, mailbox), None)

    def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                   separator: str) -> int:
        clash = [a for entry_id, held in self._held.items() if self._journal[entry_id].user == user
                 for a in held if any(conflicts(a, b, separator) for b in reservations)]
        if clash:
            raise InUse(clash)
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._journal[entry_id] = JournalEntry(entry_id, user, op, json.loads(json.dumps(data)), Step.RESERVED, owner)
        self._held[entry_id] = list(reservations)
        return entry_id

    def journal_step(self, entry_id: int, step: Step, data: dict) -> None:
        entry = self._journal[entry_id]
        entry.step, entry.data = step, json.loads(json.dumps(data))

    def end_move(self, entry_id: int) -> None:
        self._journal.pop(entry_id, None)
        self._held.pop(entry_id, None)

    def claim(self, entry_id: int, owner: str | None, expected: str | None) -> bool:
        entry = self._journal.get(entry_id)
        if entry is None or entry.owner != expected:
            return False
        entry.owner = owner
        return True

    def journal(self) -> list[JournalEntry]:
        return [JournalEntry(e.id, e.user, e.op, json.loads(json.dumps(e.data)), e.step, e.owner, e.created)
                for e in self._journal.values()]

    def reservations(self) -> list[tuple[str, Reservation]]:
        return [(self._journal[i].user, r) for i, held in self._held.items() for r in held]

    def close(self) -> None:
        pass


class SQLiteStore:
    """Placements, journal and reservations in an SQLite file; every write is one transaction.

    Several processes (proxies, the admin commands) share the file: a move's entry and
    its reservations are written under ``BEGIN IMMEDIATE`` (SQLite's write lock), so two
    moves of overlapping names can never both begin."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS placements ("
            " user TEXT NOT NULL, mailbox TEXT NOT NULL, backends TEXT NOT NULL,"
            " PRIMARY KEY (user, mailbox))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS journal ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, op TEXT NOT NULL,"
            " data TEXT NOT NULL, step TEXT NOT NULL, created REAL NOT NULL, owner TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(journal)")}
        if "owner" not in columns:  # a store written by an older version
            self._db.execute("ALTER TABLE journal ADD COLUMN owner TEXT")
        self._db.execute(  # name: the mailbox name's bytes (a client may send any), NULL: every mailbox
            "CREATE TABLE IF NOT EXISTS reservations ("
            " entry INTEGER NOT NULL, user TEXT NOT NULL, name BLOB, subtree INTEGER NOT NULL,"
            " shared INTEGER NOT NULL)"
        )
        self._version = -1

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

    def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                   separator: str) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute("SELECT name, subtree, shared FROM reservations WHERE user = ?", (user,))
            held = [Reservation(_name(n), bool(subtree), bool(shared)) for n, subtree, shared in rows.fetchall()]
            clash = [h for h in held if any(conflicts(h, r, separator) for r in reservations)]
            if clash:
                raise InUse(clash)
            cur = self._db.execute(
                "INSERT INTO journal (user, op, data, step, created, owner) VALUES (?, ?, ?, ?, ?, ?)",
                (user, op, json.dumps(data), Step.RESERVED.value, time.time(), owner),
            )
            entry_id = int(cur.lastrowid)  # type: ignore[arg-type]
            self._db.executemany(
                "INSERT INTO reservations (entry, user, name, subtree, shared) VALUES (?, ?, ?, ?, ?)",
                [(entry_id, user, None if r.name is None else r.name.encode("utf-8", "surrogateescape"),
                  int(r.subtree), int(r.shared)) for r in reservations],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return entry_id

    def journal_step(self, entry_id: int, step: Step, data: dict) -> None:
        """One transaction per step: a crash leaves the previous step or this one, never half."""
        with self._db:
            self._db.execute("UPDATE journal SET step = ?, data = ? WHERE id = ?", (step.value, json.dumps(data), entry_id))

    def end_move(self, entry_id: int) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM reservations WHERE entry = ?", (entry_id,))
            self._db.execute("DELETE FROM journal WHERE id = ?", (entry_id,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def claim(self, entry_id: int, owner: str | None, expected: str | None) -> bool:
        with self._db:
            cur = self._db.execute("UPDATE journal SET owner = ? WHERE id = ? AND owner IS ?", (owner, entry_id, expected))
        return cur.rowcount == 1

    def journal(self) -> list[JournalEntry]:
        rows = self._db.execute("SELECT id, user, op, data, step, created, owner FROM journal ORDER BY id")
        return [JournalEntry(i, u, o, json.loads(d), _step(st), ow, c)  # type: ignore[arg-type]
                for i, u, o, d, st, c, ow in rows]

    def reservations(self) -> list[tuple[str, Reservation]]:
        rows = self._db.execute("SELECT user, name, subtree, shared FROM reservations")
        return [(u, Reservation(_name(n), bool(s), bool(sh))) for u, n, s, sh in rows]

    def close(self) -> None:
        self._db.close()


def _name(stored: bytes | None) -> str | None:
    return None if stored is None else bytes(stored).decode("utf-8", "surrogateescape")


def open_store(spec: str | None) -> MapStore:
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


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def canonical_user(user: str, username_format: str = "lower") -> str:
    """The map's name for a login name: ``"lower"`` lower-cases ASCII letters only, as Dovecot's
    ``%Lu`` does (so ``BOB`` is ``bob`` everywhere); ``"as-is"`` keeps it (``%u``)."""
    return user.translate(_ASCII_LOWER) if username_format == "lower" else user


StepHook = Callable[[JournalEntry], None]


class MailboxMap:
    """lookup(user, mailbox) -> Route, from placements, rules and the default; and the moves' entries."""

    def __init__(self, config: MapConfig, store: MapStore | None = None, *, on_step: StepHook | None = None) -> None:
        self.separator = config.separator
        self._store = store if store is not None else MemoryStore()
        self.on_step = on_step  # called after each journal write (tests inject faults here)
        self._owner = process_owner()
        self._load()
        self.reconfigure(config)

    def reconfigure(self, config: MapConfig) -> None:
        """Swap in new rules (SIGHUP); placements are kept."""
        self._config = config
        self._rules = [(None if r.user is None else canonical_user(r.user, config.username_format), r)
                       for r in config.rules]

    def canonical(self, user: str) -> str:
        return canonical_user(user, self._config.username_format)

    def _load(self) -> None:
        self._placements = self._store.load()
        self._held: dict[str, list[Reservation]] = {}
        for user, r in self._store.reservations():
            self._held.setdefault(user, []).append(r)

    def _refresh(self) -> None:
        """Pick up placements and reservations written by another process."""
        if self._store.changed():
            self._load()

    @property
    def store(self) -> MapStore:
        return self._store

    # -- routing --------------------------------------------------------------------

    def lookup(self, user: str, mailbox: str) -> Route:
        self._refresh()
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        placed = self._placements.get((user, mailbox))
        if placed:
            return Route(placed)
        return self.rule_route(user, mailbox)

    def rule_route(self, user: str, mailbox: str) -> Route:
        """Where the rules and the default (not the placements) send a mailbox."""
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        for rule_user, rule in self._rules:
            if rule_user is not None and rule_user != user:
                continue
            if rule.mailbox == "*" or pattern_matches(rule.mailbox, mailbox, self.separator):
                return Route(rule.backends)
        return Route((self._config.default,))

    def backends_for(self, user: str) -> list[str]:
        """Primary backends that may own any of *user*'s mailboxes, home first."""
        self._refresh()
        user = self.canonical(user)
        found = [self.home(user).primary]
        for (u, _m), backends in self._placements.items():
            if u == user:
                found.append(backends[0])
        reaches_default = True
        for rule_user, rule in self._rules:
            if rule_user is not None and rule_user != user:
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
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        backends = tuple(backends)
        self._store.set(user, mailbox, backends)
        self._placements[(user, mailbox)] = backends

    def unplace(self, user: str, mailbox: str) -> None:
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        self._store.unset(user, mailbox)
        self._placements.pop((user, mailbox), None)

    def placements(self, user: str) -> dict[str, tuple[str, ...]]:
        self._refresh()
        user = self.canonical(user)
        return {m: b for (u, m), b in self._placements.items() if u == user}

    # -- moves: the journal and its reservations -------------------------------------------

    def reserved(self, user: str, mailbox: str) -> bool:
        """True while a move holds this mailbox (other commands on it get ``NO [INUSE]``)."""
        self._refresh()
        name = normalize(mailbox, self.separator)
        return any(not r.shared and covers(r, name, self.separator) for r in self._held.get(self.canonical(user), ()))

    def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict) -> JournalEntry:
        """Reserve the names and write the entry, in one store transaction; InUse if any is held."""
        user = self.canonical(user)
        names = [Reservation(None if r.name is None else normalize(r.name, self.separator), r.subtree, r.shared)
                 for r in reservations]
        entry_id = self._store.begin_move(user, op, names, data, self._owner, self.separator)
        self._held.setdefault(user, []).extend(names)
        entry = JournalEntry(entry_id, user, op, data, Step.RESERVED, self._owner)
        if self.on_step is not None:
            self.on_step(entry)
        return entry

    def step(self, entry: JournalEntry, step: Step) -> None:
        """Record that *entry* reached *step* (its data as it is now), durably, then tell the hook."""
        check_transition(entry.step, step)
        self._store.journal_step(entry.id, step, entry.data)
        entry.step = step
        if self.on_step is not None:
            self.on_step(entry)

    def record(self, entry: JournalEntry) -> None:
        """Write *entry*'s data as it is now, at the step it is at (more of that step is known)."""
        self._store.journal_step(entry.id, entry.step, entry.data)
        if self.on_step is not None:
            self.on_step(entry)

    def end_move(self, entry: JournalEntry) -> None:
        """The operation is over (done or undone): the entry and its reservations go together."""
        self._store.end_move(entry.id)
        entry.ended = True
        self._load()

    def claim(self, entry: JournalEntry) -> bool:
        """Take over an entry (recovery): only if its owner is still what we read."""
        if self._store.claim(entry.id, self._owner, entry.owner):
            entry.owner = self._owner
            return True
        return False

    def disown(self, entry: JournalEntry) -> None:
        """Leave an unfinished entry to whoever recovers next (this process gave up on it)."""
        if self._store.claim(entry.id, None, self._owner):
            entry.owner = None

    def entries(self) -> list[JournalEntry]:
        return self._store.journal()

    def close(self) -> None:
        self._store.close()
