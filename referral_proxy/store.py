"""Where the map's run-time state is kept: placements, the move journal and its reservations.

One contract (``MapStore``), three stores: ``MemoryStore`` (no ``[map].store``: forgotten on
exit), ``SQLiteStore`` (one host, the embedded default) and ``PostgresStore`` (several
proxies on several hosts, pgstore.py). Every write is a coroutine (the PostgreSQL store
waits on the network, never in the reactor thread); reads for routing never wait: the
proxy keeps a ``Snapshot`` in memory and ``poll()`` hands it the newest one a store knows of.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet import task
from twisted.logger import Logger

from .journal import InUse, JournalEntry, LostEntry, Reservation, Step, StoreUnavailable, conflicts, process_owner
from .journalrows import Deltas, by_entry, read_step, rebuild, stored_step, write_step
from .lifelock import LifeLocks

T = TypeVar("T")

__all__ = ["Snapshot", "MapStore", "MemoryStore", "SQLiteStore", "SchemaError", "SCHEMA_VERSION", "TransferCounts",
           "sqlite_migrate"]

# The map store's schema (SQLite: ``PRAGMA user_version``, 0 in files older than version 2;
# PostgreSQL: map_state.schema_version). 2: the transfer counters (transfer_counts). 3: a journal
# entry's steps as rows of what changed (journal_steps, journal.nsteps: journalrows.py).
SCHEMA_VERSION = 3

# SQLite: how long a write waits for another process's write lock (a `sqlite3` shell's BEGIN
# EXCLUSIVE, a backup) before it fails with StoreUnavailable; a proxy waits in LOCK_TRY slices
# between which its reactor runs (other sessions are served), LOCK_RETRY apart.
LOCK_WAIT = 10.0
LOCK_TRY = 0.02
LOCK_RETRY = 0.05

# (kind, result) -> (transfers, message bytes): counted in the store by processes other than
# the proxies (the admin ``move``), read by every proxy's /metrics.
TransferCounts = dict[tuple[str, str], tuple[int, int]]


class SchemaError(Exception):
    """The store has no schema, or one of another version: `referral-proxy map --config FILE migrate`
    (or a newer referral-proxy)."""


@dataclass(frozen=True)
class Snapshot:
    """Everything routing needs, as of one moment: placements and the reservations of live moves.

    *reservations*: (journal entry id, user, reservation)."""

    placements: dict[tuple[str, str], tuple[str, ...]]
    reservations: tuple[tuple[int, str, Reservation], ...]


log = Logger()


class MapStore(Protocol):
    """The contract every store keeps (tests/test_store_contract.py runs one suite on each):

    * ``begin_move`` checks the reservations of every live entry of the user and writes the
      new entry with its own in ONE transaction, or raises InUse writing nothing; two
      processes (or hosts) can never both begin overlapping moves;
    * ``journal_step`` writes an entry's step and data only while *owner* owns it (else
      LostEntry): a process whose entry was taken over stops at its next step;
    * ``end_move`` removes an entry and its reservations in one transaction;
    * ``claim`` takes an entry over from *expected* (compare-and-set), and only if
      *expected* is None, known *dead* by the caller, or (stores with ``leases``) its lease
      ran out: two recoverers never both win; ``disown`` gives it up;
    * ``poll`` never waits on I/O across a network; after a write of this process returns,
      no older snapshot is ever handed out;
    * ``count_transfer`` adds one transfer and its bytes to the store's persistent counter of
      (kind, result), in one statement (two processes counting at once both count);
      ``transfer_counts`` reads every counter: transfers run outside the proxies (the
      admin move) reach every proxy's /metrics that way;
    * an unreachable store raises StoreUnavailable (and writes nothing).
    """

    leases: bool  # entries carry a lease the owner renews (JournalEntry.lease_expired is set)

    def start(self) -> None:
        """Before serving, blocking: connect and check (PostgreSQL: schema, first read, listener)."""
    def poll(self) -> Snapshot | None:
        """The newest state if it changed since the last load/poll (None: unchanged)."""
    async def load(self) -> Snapshot: ...
    async def placement(self, user: str, mailbox: str) -> tuple[str, ...] | None:
        """One placement as the store has it now, not as a poll last saw it (a move that ended a moment ago
        at another proxy: mover.Mover.rename looks once it holds the name)."""
    async def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None: ...
    async def unset(self, user: str, mailbox: str) -> None: ...
    async def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                         separator: str) -> int: ...
    async def journal_step(self, entry_id: int, step: Step, data: dict, owner: str | None) -> None: ...
    async def end_move(self, entry_id: int) -> None: ...
    async def claim(self, entry_id: int, owner: str, expected: str | None, dead: bool = False) -> bool: ...
    async def disown(self, entry_id: int, owner: str) -> bool: ...
    async def renew(self, owner: str, entry_ids: Sequence[int]) -> list[int]:
        """Extend the lease of those of *entry_ids* that *owner* holds; their ids (none for stores without leases)."""
    async def journal(self) -> list[JournalEntry]: ...
    async def journal_owners(self) -> list[tuple[int, str | None, bool]]:
        """(entry id, owner, its lease ran out) of every entry: one cheap read (recovery's quick check)."""
    async def settle(self) -> None:
        """Return once the other processes have (as good as surely) learnt of this one's last write."""
    async def count_transfer(self, kind: str, result: str, nbytes: int) -> None: ...
    async def transfer_counts(self) -> TransferCounts: ...
    async def close(self) -> None: ...


def _copy(data: dict) -> dict:
    return json.loads(json.dumps(data))


class MemoryStore:
    """A store that forgets everything on exit (no ``[map].store`` configured, and tests)."""

    leases = False

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[str, ...]] = {}
        self._journal: dict[int, JournalEntry] = {}
        self._held: dict[int, list[Reservation]] = {}
        self._counts: TransferCounts = {}
        self._next_id = 1

    def _snapshot(self) -> Snapshot:
        return Snapshot(dict(self._rows), tuple((i, self._journal[i].user, r)
                                                for i, held in self._held.items() for r in held))

    def start(self) -> None:
        pass

    def poll(self) -> Snapshot | None:
        return None  # only this process writes it, and it keeps its cache itself

    async def load(self) -> Snapshot:
        return self._snapshot()

    async def placement(self, user: str, mailbox: str) -> tuple[str, ...] | None:
        return self._rows.get((user, mailbox))

    async def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None:
        self._rows[(user, mailbox)] = tuple(backends)

    async def unset(self, user: str, mailbox: str) -> None:
        self._rows.pop((user, mailbox), None)

    async def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                         separator: str) -> int:
        clash = [a for entry_id, held in self._held.items() if self._journal[entry_id].user == user
                 for a in held if any(conflicts(a, b, separator) for b in reservations)]
        if clash:
            raise InUse(clash)
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._journal[entry_id] = JournalEntry(entry_id, user, op, _copy(data), Step.RESERVED, owner)
        self._held[entry_id] = list(reservations)
        return entry_id

    async def journal_step(self, entry_id: int, step: Step, data: dict, owner: str | None) -> None:
        entry = self._journal.get(entry_id)
        if entry is None or entry.owner != owner:
            raise LostEntry(f"journal entry {entry_id} is no longer ours")
        entry.step, entry.data = step, _copy(data)

    async def end_move(self, entry_id: int) -> None:
        self._journal.pop(entry_id, None)
        self._held.pop(entry_id, None)

    async def claim(self, entry_id: int, owner: str, expected: str | None, dead: bool = False) -> bool:
        entry = self._journal.get(entry_id)
        if entry is None or entry.owner != expected:
            return False
        entry.owner = owner
        return True

    async def disown(self, entry_id: int, owner: str) -> bool:
        entry = self._journal.get(entry_id)
        if entry is None or entry.owner != owner:
            return False
        entry.owner = None
        return True

    async def renew(self, owner: str, entry_ids: Sequence[int]) -> list[int]:
        return []

    async def settle(self) -> None:
        pass  # SQLite: another process reads the file at its next lookup

    async def journal(self) -> list[JournalEntry]:
        return [JournalEntry(e.id, e.user, e.op, _copy(e.data), e.step, e.owner, e.created)
                for e in self._journal.values()]

    async def journal_owners(self) -> list[tuple[int, str | None, bool]]:
        return [(e.id, e.owner, False) for e in self._journal.values()]

    async def count_transfer(self, kind: str, result: str, nbytes: int) -> None:
        n, total = self._counts.get((kind, result), (0, 0))
        self._counts[(kind, result)] = (n + 1, total + nbytes)

    async def transfer_counts(self) -> TransferCounts:
        return dict(self._counts)

    async def close(self) -> None:
        pass


def _unfork(store: weakref.ref[SQLiteStore]) -> None:
    if (alive := store()) is not None:
        alive._unfork()


class SQLiteStore:
    """Placements, journal and reservations in an SQLite file; every write is one transaction.

    Several processes on one host (proxies, the admin commands) share the file: a move's
    entry and its reservations are written under ``BEGIN IMMEDIATE`` (SQLite's write
    lock), so two moves of overlapping names can never both begin. A local file: its
    coroutines never wait (each statement takes microseconds), and ``poll`` reads
    SQLite's data_version to see another process's commits.

    Another process may hold the write lock for long (``BEGIN EXCLUSIVE`` in a ``sqlite3``
    shell): a write waits LOCK_WAIT at most, then raises StoreUnavailable. With a *clock* (the
    proxy's reactor) it waits in LOCK_TRY slices on that clock, never blocking the reactor for
    longer (seen: SQLite's own 10 s wait in the reactor thread held every session's NOOP 9 s);
    without one (the admin commands) it blocks, as SQLite does."""

    leases = False

    def __init__(self, path: str | Path, clock: Any = None) -> None:
        self._clock, self._path = clock, path
        self._conn: sqlite3.Connection | None = None
        os.register_at_fork(before=functools.partial(_unfork, weakref.ref(self)))
        self._connect()
        self._refusal: str | None = None
        try:
            self.migrated = sqlite_migrate(self._db)  # a file of an older version is brought up to date here
        except SchemaError as e:
            self._refusal = str(e)  # start() says it; nothing is read or written
        self._life: LifeLocks | None = None  # whose entries' owners still run (lifelock.py); None: only pids tell
        self._held_as: set[str] = set()  # the owner ids this store took the lock of (a fork's is another)
        if self._refusal is None and str(path) != ":memory:" and not str(path).startswith("file:"):
            try:
                life = LifeLocks(path)
                life.sweep({o for (o,) in self._db.execute("SELECT DISTINCT owner FROM journal WHERE owner IS NOT NULL")})
                self._life = life
            except (OSError, sqlite3.Error) as e:
                self._no_lock(e)
            self._hold()

    def _connect(self) -> None:
        """A connection of this process's own: SQLite's must not cross a fork (twistd makes the service, then forks
        its daemon: its connection held none of SQLite's locks, the next process to close the file removed the
        WAL under it, and its writes went into a deleted file: moves no longer exclusive, mail split and out of
        sight, probe x1 of stop 52). So it is closed before any fork (os.register_at_fork), and opened again
        by whichever process uses it next; closing one inherited would let SQLite remove the WAL."""
        self._pid = os.getpid()
        self._conn = sqlite3.connect(str(self._path), isolation_level=None, timeout=LOCK_WAIT)
        self._conn.execute("PRAGMA journal_mode=WAL")
        if self._clock is not None:
            self._conn.execute(f"PRAGMA busy_timeout = {int(LOCK_TRY * 1000)}")
        self._version = -1  # (read everything again: the other connection's data_version says nothing here)
        self._deltas = Deltas()

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._connect()
        assert self._conn is not None
        return self._conn

    def _unfork(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def _hold(self) -> None:
        """This process's lock, taken before anything it writes may name it (again after a fork: twistd)."""
        if self._life is not None and (me := process_owner()) not in self._held_as:
            try:
                self._life.hold(me)
            except OSError as e:
                return self._no_lock(e)
            self._held_as.add(me)

    def _no_lock(self, e: Exception) -> None:
        log.warn("SQLite map store: no lock of this process's in {d} ({why}): its moves are known by their pid only, "
                 "and one of another container or host name is never taken for dead", d=str(self._path) + ".owners",
                 why=str(e))
        self._life = None

    async def _locked(self, work: Callable[[], T]) -> T:
        """*work()* (statements in this connection), tried again while another process holds the
        lock, LOCK_WAIT at most; a failing database (locked past that, I/O error, disk full) is
        StoreUnavailable, as an unreachable PostgreSQL is."""
        deadline = time.monotonic() + LOCK_WAIT
        self._hold()
        while True:
            try:
                return work()
            except sqlite3.OperationalError as e:
                if self._clock is None or not _busy(e) or time.monotonic() >= deadline:
                    raise StoreUnavailable(f"SQLite map store: {e}") from None
            await task.deferLater(self._clock, LOCK_RETRY, lambda: None)

    def _data_version(self) -> int:
        # Changes when ANOTHER connection commits (a local file read, microseconds).
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _read(self) -> Snapshot:
        self._db.execute("BEGIN")
        try:
            self._version = self._data_version()
            rows = self._db.execute("SELECT user, mailbox, backends FROM placements").fetchall()
            held = self._db.execute("SELECT entry, user, name, subtree, shared FROM reservations").fetchall()
        finally:
            self._db.execute("COMMIT")
        return Snapshot({(_text(u), _text(m)): tuple(b.split(",")) for u, m, b in rows},
                        tuple((e, _text(u), Reservation(_name(n), bool(s), bool(sh))) for e, u, n, s, sh in held))

    def start(self) -> None:
        if self._refusal is not None:
            raise SchemaError(self._refusal)

    def poll(self) -> Snapshot | None:
        if self._refusal is not None:
            return None
        try:
            if self._data_version() == self._version:
                return None
            return self._read()
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
            return None  # routed from the cache until the lock is gone (a WAL reader seldom waits)

    async def load(self) -> Snapshot:
        return await self._locked(self._read)

    async def placement(self, user: str, mailbox: str) -> tuple[str, ...] | None:
        row = await self._locked(lambda: self._db.execute("SELECT backends FROM placements WHERE user = ? AND "
                                                          "mailbox = ?", (_key(user), _key(mailbox))).fetchone())
        return None if row is None else tuple(row[0].split(","))

    async def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None:
        def work() -> None:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO placements (user, mailbox, backends) VALUES (?, ?, ?)",
                    (_key(user), _key(mailbox), ",".join(backends)),
                )

        await self._locked(work)

    async def unset(self, user: str, mailbox: str) -> None:
        def work() -> None:
            with self._db:
                self._db.execute("DELETE FROM placements WHERE user = ? AND mailbox = ?", (_key(user), _key(mailbox)))

        await self._locked(work)

    async def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                         separator: str) -> int:
        def work() -> int:
            self._db.execute("BEGIN IMMEDIATE")  # locked: raised before the transaction began
            try:
                rows = self._db.execute("SELECT name, subtree, shared FROM reservations WHERE user = ?", (_key(user),))
                held = [Reservation(_name(n), bool(subtree), bool(shared)) for n, subtree, shared in rows.fetchall()]
                clash = [h for h in held if any(conflicts(h, r, separator) for r in reservations)]
                if clash:
                    raise InUse(clash)
                cur = self._db.execute(
                    "INSERT INTO journal (user, op, data, step, created, owner) VALUES (?, ?, ?, ?, ?, ?)",
                    (_key(user), op, text, Step.RESERVED.value, time.time(), owner),
                )
                entry_id = int(cur.lastrowid)  # type: ignore[arg-type]
                self._db.executemany(
                    "INSERT INTO reservations (entry, user, name, subtree, shared) VALUES (?, ?, ?, ?, ?)",
                    [(entry_id, _key(user), _blob(r.name), int(r.subtree), int(r.shared)) for r in reservations],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return entry_id

        text = json.dumps(data)
        entry_id = await self._locked(work)
        self._deltas.began(entry_id, text)
        return entry_id

    async def journal_step(self, entry_id: int, step: Step, data: dict, owner: str | None) -> None:
        """One transaction per step (owner checked, what changed added): a crash leaves the previous step or this one."""
        async def write(whole: bool, expected: int | None, text: str) -> int | None:
            return await self._locked(lambda: self._write_step(entry_id, step, owner, whole, expected, text))

        if not await write_step(self._deltas, entry_id, data, write):
            raise LostEntry(f"journal entry {entry_id} is no longer ours")

    def _write_step(self, entry_id: int, step: Step, owner: str | None, whole: bool, expected: int | None,
                    text: str) -> int | None:
        """The step and its row (journalrows.py) in one transaction; the new seq, or None (nothing written)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute(
                "UPDATE journal SET step = ?, nsteps = nsteps + 1 WHERE id = ? AND owner IS ?"
                " AND (? IS NULL OR nsteps = ?) RETURNING nsteps",
                (stored_step(step), entry_id, owner, expected, expected)).fetchall()
            if not rows:
                self._db.execute("ROLLBACK")
                return None
            if whole:  # the rows before it are superseded
                self._db.execute("DELETE FROM journal_steps WHERE entry = ?", (entry_id,))
            self._db.execute("INSERT INTO journal_steps (entry, seq, whole, delta) VALUES (?, ?, ?, ?)",
                             (entry_id, int(rows[0][0]), int(whole), text))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return int(rows[0][0])

    async def end_move(self, entry_id: int) -> None:
        def work() -> None:
            self._db.execute("BEGIN IMMEDIATE")  # locked: raised before the transaction began
            try:
                self._db.execute("DELETE FROM reservations WHERE entry = ?", (entry_id,))
                self._db.execute("DELETE FROM journal_steps WHERE entry = ?", (entry_id,))
                self._db.execute("DELETE FROM journal WHERE id = ?", (entry_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        await self._locked(work)
        self._deltas.forget(entry_id)

    async def claim(self, entry_id: int, owner: str, expected: str | None, dead: bool = False) -> bool:
        def work() -> bool:
            with self._db:
                cur = self._db.execute("UPDATE journal SET owner = ? WHERE id = ? AND owner IS ?", (owner, entry_id, expected))
            return cur.rowcount == 1

        return await self._locked(work)

    async def disown(self, entry_id: int, owner: str) -> bool:
        self._deltas.forget(entry_id)  # whoever takes it next writes its first step whole

        def work() -> bool:
            with self._db:
                cur = self._db.execute("UPDATE journal SET owner = NULL WHERE id = ? AND owner = ?", (entry_id, owner))
            return cur.rowcount == 1

        return await self._locked(work)

    async def renew(self, owner: str, entry_ids: Sequence[int]) -> list[int]:
        return []

    async def settle(self) -> None:
        pass  # SQLite: another process reads the file at its next lookup

    async def journal(self) -> list[JournalEntry]:
        def work() -> list[JournalEntry]:
            self._db.execute("BEGIN")  # the entries and their rows as of one moment
            try:
                rows = self._db.execute("SELECT id, user, op, data, step, created, owner FROM journal ORDER BY id").fetchall()
                steps = by_entry(self._db.execute("SELECT entry, whole, delta FROM journal_steps ORDER BY entry, seq"))
            finally:
                self._db.execute("COMMIT")
            return [JournalEntry(i, _text(u), o, rebuild(d, steps.get(i, ())), read_step(st), ow, c)  # type: ignore[arg-type]
                    for i, u, o, d, st, c, ow in rows]

        return await self._locked(work)

    async def journal_owners(self) -> list[tuple[int, str | None, bool]]:
        def work() -> list[tuple[int, str | None, bool]]:
            return [(int(i), ow, False) for i, ow in self._db.execute("SELECT id, owner FROM journal")]

        return await self._locked(work)

    async def count_transfer(self, kind: str, result: str, nbytes: int) -> None:
        def work() -> None:
            with self._db:
                self._db.execute(
                    "INSERT INTO transfer_counts (kind, result, n, bytes) VALUES (?, ?, 1, ?)"
                    " ON CONFLICT (kind, result) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes",
                    (kind, result, int(nbytes)))

        await self._locked(work)

    async def transfer_counts(self) -> TransferCounts:
        def work() -> TransferCounts:
            rows = self._db.execute("SELECT kind, result, n, bytes FROM transfer_counts").fetchall()
            return {(k, r): (int(n), int(b)) for k, r, n, b in rows}

        return await self._locked(work)

    async def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None
        if self._life is not None:
            for me in self._held_as:
                self._life.release(me)
            self._life = None


_SQLITE_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS placements ("
    " user TEXT NOT NULL, mailbox TEXT NOT NULL, backends TEXT NOT NULL, PRIMARY KEY (user, mailbox))",
    "CREATE TABLE IF NOT EXISTS journal ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, op TEXT NOT NULL,"
    " data TEXT NOT NULL, step TEXT NOT NULL, created REAL NOT NULL, owner TEXT, nsteps INTEGER NOT NULL DEFAULT 0)",
    # version 3: each step of an entry, what changed (or, whole, all of its data): journalrows.py
    "CREATE TABLE IF NOT EXISTS journal_steps ("
    " entry INTEGER NOT NULL, seq INTEGER NOT NULL, whole INTEGER NOT NULL, delta TEXT NOT NULL,"
    " PRIMARY KEY (entry, seq))",
    # name: the mailbox name's bytes (a client may send any), NULL: every mailbox
    "CREATE TABLE IF NOT EXISTS reservations ("
    " entry INTEGER NOT NULL, user TEXT NOT NULL, name BLOB, subtree INTEGER NOT NULL, shared INTEGER NOT NULL)",
    # version 2: transfers counted by processes other than the proxies (the admin move)
    "CREATE TABLE IF NOT EXISTS transfer_counts ("
    " kind TEXT NOT NULL, result TEXT NOT NULL, n INTEGER NOT NULL, bytes INTEGER NOT NULL,"
    " PRIMARY KEY (kind, result))",
]


def sqlite_migrate(db: sqlite3.Connection) -> str:
    """Create or bring an SQLite map file's schema to SCHEMA_VERSION, in one transaction (two
    processes opening an old file at once: one migrates, the other finds it done); one line.

    A file of version 1 (user_version 0: placements, journal, reservations) keeps everything.
    A file already at SCHEMA_VERSION is only read (no write lock taken). SchemaError for a
    file of a newer version (it is left untouched)."""
    version = _user_version(db)
    if version == SCHEMA_VERSION:
        return f"schema is up to date (version {SCHEMA_VERSION})"
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(db)  # another process may have migrated it meanwhile
        fresh = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'placements'").fetchone()[0] == 0
        if version < SCHEMA_VERSION:
            for statement in _SQLITE_SCHEMA:
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(journal)")}
            if "owner" not in columns:  # a journal written before moves had owners
                db.execute("ALTER TABLE journal ADD COLUMN owner TEXT")
            if "nsteps" not in columns:  # version 3; its entries' data is all in the row (no journal_steps)
                db.execute("ALTER TABLE journal ADD COLUMN nsteps INTEGER NOT NULL DEFAULT 0")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    if version > SCHEMA_VERSION:
        raise SchemaError(f"the SQLite map store's schema is version {version}, newer than this "
                          f"referral-proxy's ({SCHEMA_VERSION}): upgrade referral-proxy")
    if version == SCHEMA_VERSION:
        return f"schema is up to date (version {SCHEMA_VERSION})"
    return f"schema {'created' if fresh else f'migrated from version {max(version, 1)}'} (version {SCHEMA_VERSION})"


def _busy(e: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY / SQLITE_LOCKED): worth waiting for."""
    return getattr(e, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e)


def _user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _key(name: str) -> str | bytes:
    """A name as SQLite keeps it: text if it is UTF-8, else its bytes (a client may send any)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape")


def _text(stored: str | bytes) -> str:
    return stored if isinstance(stored, str) else bytes(stored).decode("utf-8", "surrogateescape")


def _blob(name: str | None) -> bytes | None:
    return None if name is None else name.encode("utf-8", "surrogateescape")


def _name(stored: bytes | None) -> str | None:
    return None if stored is None else bytes(stored).decode("utf-8", "surrogateescape")
