"""The map store in PostgreSQL: several proxies (and hosts) share placements, reservations, the journal.

How it keeps store.MapStore's contract:

* the reactor never waits: every statement runs in a bounded thread pool (POOL_SIZE threads, each with its own
  connection) through ``deferToThreadPool``, with a connect timeout, a statement and lock timeout, and TCP
  keepalives;
* every write that changes what routing reads (placements, a move's begin and end) updates the one row of
  ``map_state`` (its ``change`` counter, which also serializes those writes: two overlapping moves can never both
  begin) and sends ``NOTIFY referral_proxy_map`` in the same transaction;
* a listener thread, on its own connection, LISTENs, and on each notification (and after each reconnect) re-reads
  placements and reservations in one REPEATABLE READ transaction; ``poll()`` hands the newest to the reactor thread
  without I/O, never one older than this process's own last write (its ``change``); it writes the change it has read
  in ``listeners`` (and a heartbeat every HEALTH_SECONDS), and ``settle()`` waits until every live listener has read
  this process's last write; a change that brings journal entries new to a listener is said read only once its
  reactor confirms it (``on_new_entries``, proxyappends.py: its APPENDs under way to their names answered), and
  ``confirmed()`` waits for that;
* a move's owner holds a lease (``lease_until``, the database's clock), renewed by its process; recovery takes an
  entry over only when the lease has run out (or its owner, on this host, is dead), by compare-and-set; each journal
  step is written only while the writer still owns the entry (LostEntry otherwise);
* a connection error or timeout raises StoreUnavailable: nothing was written;
* a server that answers nothing at all (SIGSTOPped, a frozen VM: the kernel keeps its sockets open, so neither
  keepalives nor its own statement_timeout end the wait) is given up on after CLIENT_DEADLINE: StoreUnavailable, and
  every statement fails at once until the listener hears from it again. Such a write may still land when the server
  wakes: callers that would act on "nothing was written" (a move's roll-back) leave the entry to recovery instead.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .journal import (
    InUse,
    JournalEntry,
    LostEntry,
    Reservation,
    Step,
    StoreUnavailable,
    conflicts,
    owner_gone,
    process_owner,
)
from .journalrows import Deltas, by_entry, read_step, rebuild, write_step
from .pgjournal import local_renames, read_journal, write_step_row
from .pgschema import check_schema, migrate_on
from .store import SCHEMA_VERSION, SchemaError, Snapshot, TransferCounts
from .storethreads import StorePool

__all__ = ["PostgresStore", "SchemaError", "migrate", "SCHEMA_VERSION", "CHANNEL", "POOL_SIZE"]

log = Logger()

# SCHEMA_VERSION (store.py): `referral-proxy map migrate` brings a database to it; a proxy checks it at start-up
CHANNEL = "referral_proxy_map"
POOL_SIZE = 4  # threads (and connections) of one process; writes are short transactions
CONNECT_TIMEOUT = 5  # seconds
STATEMENT_TIMEOUT_MS = 10_000  # a statement (or a lock wait) longer than this fails: StoreUnavailable
IDLE_CHECK_SECONDS = 1.0  # a pooled connection idle longer is checked (SELECT 1) before a write uses it
HEALTH_SECONDS = 2.0
FENCE_SECONDS = 4.0  # a listener that heard nothing from the server this long: its map may be stale (_watch)
CLIENT_DEADLINE = CONNECT_TIMEOUT + STATEMENT_TIMEOUT_MS / 1000 + 2  # a statement's thread waited longer: hung
CONFIRM_LIMIT = 15.0  # a change not confirmed this long (proxyappends.CONFIRM_WAIT: 12 s) is said read anyway
LIVE_SECONDS = 3 * HEALTH_SECONDS  # a listener silent longer is taken for gone (settle does not wait for it)
SETTLE_SECONDS = 2.0  # a move's begin and end wait at most this long for every live proxy to have read them
QUIET_BEAT = HEALTH_SECONDS + 1.0  # ... and longer (LIVE_SECONDS) for one that has not beaten this long: stalled
_OPTIONS = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={STATEMENT_TIMEOUT_MS} -c idle_in_transaction_session_timeout=60000"


def _conninfo(dsn: str, name: str) -> str:
    """The configured URI with the timeouts and keepalives every connection of ours has."""
    return make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT, options=_OPTIONS, application_name=name,
                         keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3)

T = TypeVar("T")


def _b(s: str | None) -> bytes | None:
    return None if s is None else s.encode("utf-8", "surrogateescape")


def _s(b: bytes | None) -> str | None:
    return None if b is None else bytes(b).decode("utf-8", "surrogateescape")


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(_conninfo(dsn, "referral-proxy"), autocommit=True)
    except psycopg.Error as e:
        raise StoreUnavailable(f"PostgreSQL: {_why(e)}") from None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def migrate(dsn: str) -> str:
    """Create or bring the schema to SCHEMA_VERSION (idempotent); what was done, one line."""
    conn = _connect(dsn)
    try:
        before = migrate_on(conn)
    finally:
        conn.close()
    if before == SCHEMA_VERSION:
        return f"schema is up to date (version {SCHEMA_VERSION})"
    return f"schema {'created' if before is None else f'migrated from version {before}'} (version {SCHEMA_VERSION})"


def _read_snapshot(conn: psycopg.Connection[Any]) -> tuple[int, Snapshot]:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return _snapshot_rows(conn)


def _snapshot_rows(conn: psycopg.Connection[Any]) -> tuple[int, Snapshot]:
    row = conn.execute("SELECT change FROM map_state").fetchone()
    change = int(row[0]) if row else 0
    placements = conn.execute("SELECT username, mailbox, backends FROM placements").fetchall()
    held = conn.execute("SELECT entry, username, name, subtree, shared FROM reservations").fetchall()
    return change, Snapshot(
        {(_s(u), _s(m)): tuple(b.split(",")) for u, m, b in placements},  # type: ignore[misc]
        tuple((int(e), _s(u), Reservation(_s(n), bool(st), bool(sh))) for e, u, n, st, sh in held),  # type: ignore[misc]
    )


def _listener_gone(listener: str) -> bool:
    """A listener row (``host:pid:start/token``) of a process on this host that no longer runs: a proxy
    SIGKILLed left it (a listener of another host, or of an older version, is never taken for gone)."""
    owner, slash, _token = listener.rpartition("/")
    return bool(slash) and owner_gone(owner)


def _bump(conn: psycopg.Connection[Any]) -> int:
    """Count a change routing must learn of, tell every listener at commit; the row lock serializes."""
    row = conn.execute("UPDATE map_state SET change = change + 1 RETURNING change").fetchone()
    if row is None:
        raise SchemaError("the PostgreSQL map store has no schema: run `referral-proxy map --config FILE migrate`")
    conn.execute(f"NOTIFY {CHANNEL}")
    return int(row[0])


class PostgresStore:
    """store.MapStore in PostgreSQL (see the module's docstring)."""

    leases = True

    def __init__(self, dsn: str, reactor: Any, *, lease_seconds: float = 60.0, pool_size: int = POOL_SIZE) -> None:
        self.dsn = dsn
        self.lease_seconds = float(lease_seconds)
        self._reactor = reactor
        self._pool = StorePool(minthreads=0, maxthreads=pool_size, name="map-store")
        self._idle: queue.LifoQueue[tuple[psycopg.Connection[Any], float]] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._pending: Snapshot | None = None
        self._pending_change = -1
        self._floor = -1  # the change of this process's own last write: no older snapshot is handed out
        self._seen = -1  # the newest change the listener has read
        self._id = f"{process_owner()}/{secrets.token_hex(4)}"  # this listener in `listeners` (_listener_gone)
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._started = False
        self.available = True
        self._heard = time.monotonic()  # when the listener last heard the server (_watch)
        self._hung = False  # a statement outlived CLIENT_DEADLINE: fail at once until the listener hears the server
        self.on_availability: Callable[[bool], None] | None = None  # called in the reactor thread
        # proxyappends.confirmer: called in the reactor thread with a change that brought journal entries
        # new to this listener; the listener says it has read that change only once confirm() is called
        self.on_new_entries: Callable[[int, list[tuple[int, str, Reservation]], dict[int, str]], None] | None = None
        self._known: set[int] | None = None  # the entries the listener has read (None: nothing read yet)
        # changes read, not said read in `listeners` until confirmed: (the change said read before, since when)
        self._unconfirmed: dict[int, tuple[int, float]] = {}
        self._deltas = Deltas()

    # -- start-up and the listener ------------------------------------------------------------

    def start(self) -> None:
        """Before serving (blocking): connect, check the schema, read all, start the listener and the pool."""
        if self._started:
            return
        self._id = f"{process_owner()}/{secrets.token_hex(4)}"  # (anew: a fork's, twistd's daemon, is another)
        conn = _connect(self.dsn)
        try:
            check_schema(conn)
            # In `listeners` before the snapshot is read (seen: nothing yet): a move that begins from
            # here on waits in settle() until this proxy's listener has read it; one that began before
            # this row is in the snapshot. (Row after snapshot: a move begun in between, while the
            # listener was still connecting, went ahead with this proxy routing from a map without it.)
            self._beat(conn)
            change, snapshot = _read_snapshot(conn)
        except psycopg.Error as e:
            conn.close()
            raise StoreUnavailable(f"PostgreSQL: {_why(e)}") from None
        except BaseException:
            conn.close()
            raise
        self._release(conn)
        self._known = {e for e, _u, _r in snapshot.reservations}
        self._publish(change, snapshot)
        self._started = True
        self._pool.start()
        self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)
        self._listener = threading.Thread(target=self._listen, name="map-store-listener", daemon=True)
        self._listener.start()
        self._heard = time.monotonic()
        threading.Thread(target=self._watch, name="map-store-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """A listener stalled (a half-open socket, a frozen server process: probe t5 of stop 51) hears no change and
        says nothing: after FENCE_SECONDS unheard the store is unavailable (no name made: routing.available) until
        the listener has read the map again, before LIVE_SECONDS (no settle() goes on without it by then)."""
        while not self._stopping.wait(FENCE_SECONDS / 8):
            if self.available and time.monotonic() - self._heard > FENCE_SECONDS:
                self._set_available(False)

    def _publish(self, change: int, snapshot: Snapshot) -> None:
        with self._lock:
            if change >= self._floor and change >= self._pending_change:
                self._pending, self._pending_change = snapshot, change
            self._seen = max(self._seen, change)

    def _set_available(self, up: bool) -> None:
        if up == self.available:
            return
        self.available = up
        self._reactor.callFromThread(self._availability_changed, up)

    def _availability_changed(self, up: bool) -> None:
        if up:
            log.info("map store: PostgreSQL reachable again; placements re-read")
        else:
            log.warn("map store: PostgreSQL unreachable; routing from the cached map, moves refused until it is back")
        if self.on_availability is not None:
            self.on_availability(up)

    def _read_and_tell(self, conn: psycopg.Connection[Any]) -> None:
        change, snapshot = _read_snapshot(conn)
        ids = {e for e, _u, _r in snapshot.reservations}
        new = [] if self._known is None else [  # (a shared one, a cross-server MOVE's, holds no APPEND back)
            held for held in snapshot.reservations if held[0] not in self._known and not held[2].shared]
        self._known = ids
        hook = self.on_new_entries
        if new and hook is not None:
            with self._lock:  # (a burst read at once: the entry began after the change read before, not at *change*)
                self._unconfirmed[change] = (self._seen, time.monotonic())
        self._publish(change, snapshot)  # (before the hook: an APPEND begun from now on meets the reservation)
        if new and hook is not None:  # (with the RENAMEs on one backend among them: renamehold.hold_for_another)
            mine = self._id.rpartition("/")[0]  # (this process's own RENAME holds its sessions itself)
            self._reactor.callFromThread(hook, change, new, local_renames(conn, [e for e, _u, _r in new], mine))
        self._beat(conn)

    def _said_seen(self) -> int:
        """The change this proxy says it has read: the newest, or the one read before a change not yet confirmed."""
        with self._lock:
            late = time.monotonic() - CONFIRM_LIMIT
            for change in [c for c, (_before, since) in self._unconfirmed.items() if since < late]:
                del self._unconfirmed[change]  # (a hook that never answered: nobody waits for ever)
            return min(before for before, _since in self._unconfirmed.values()) if self._unconfirmed else self._seen

    def confirm(self, change: int) -> None:
        """(The reactor thread's) *change* confirmed (proxyappends.py): said read in `listeners` now."""
        with self._lock:
            self._unconfirmed.pop(change, None)
        seen = self._said_seen()
        running = defer.ensureDeferred(self._run(lambda conn: conn.execute(
            "UPDATE listeners SET seen = greatest(seen, %s) WHERE id = %s", (seen, self._id))))
        running.addErrback(lambda f: log.debug("map store: could not confirm change {c}: {why}", c=change,
                                               why=f.getErrorMessage()))

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        """Say which change this proxy has read (settle() of every proxy waits for the live ones)."""
        conn.execute("INSERT INTO listeners (id, seen, beat) VALUES (%s, %s, clock_timestamp())"
                     " ON CONFLICT (id) DO UPDATE SET seen = greatest(listeners.seen, EXCLUDED.seen),"
                     " beat = EXCLUDED.beat", (self._id, self._said_seen()))

    def _listen(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            conn = None
            try:
                conn = psycopg.connect(_conninfo(self.dsn, "referral-proxy listener"), autocommit=True)
                conn.execute(f"LISTEN {CHANNEL}")
                self._read_and_tell(conn)  # after a reconnect: everything again
                self._answered()
                delay = 0.2
                while not self._stopping.is_set():
                    notified = False
                    for _n in conn.notifies(timeout=HEALTH_SECONDS, stop_after=1):
                        notified = True
                    if notified:
                        for _n in conn.notifies(timeout=0.001):  # the rest of a burst: one re-read
                            pass
                        self._read_and_tell(conn)
                    else:
                        self._beat(conn)  # alive (and a server gone quiet is noticed)
                    self._answered()
                conn.execute("DELETE FROM listeners WHERE id = %s", (self._id,))
            except Exception as e:
                if self._stopping.is_set():
                    break
                self._set_available(False)
                log.debug("map store listener: {why}", why=_why(e))
                self._stopping.wait(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass

    def _answered(self) -> None:
        """The server answered the listener: statements may be sent again."""
        self._heard = time.monotonic()
        self._hung = False
        self._set_available(True)

    def _stop_threads(self) -> None:
        self._stopping.set()
        if self._pool.started:  # a statement a hung server holds is not waited for (storethreads.py)
            self._pool.stop(0.0 if self._hung else CLIENT_DEADLINE)
        while True:
            try:
                self._idle.get_nowait()[0].close()
            except queue.Empty:
                break

    def _checked_out(self) -> psycopg.Connection[Any]:
        """An idle connection that still answers (one idle a while is asked first: a server
        restarted meanwhile cut it, and a write must not fail for that), or a new one."""
        while True:
            try:
                conn, last = self._idle.get_nowait()
            except queue.Empty:
                return _connect(self.dsn)
            if time.monotonic() - last < IDLE_CHECK_SECONDS:
                return conn
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                conn.close()

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        if not conn.closed:
            self._idle.put((conn, time.monotonic()))

    def _in_thread(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = self._checked_out()
        try:
            with conn.transaction():
                result = work(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            conn.close()
            raise StoreUnavailable(f"PostgreSQL: {_why(e)}") from None
        except BaseException:
            self._release(conn)
            raise
        self._release(conn)
        return result

    async def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        if not self._started:
            self.start_in_reactor()
        if self._hung:
            raise StoreUnavailable("PostgreSQL: not answering (a statement is still waiting for it)")
        running = deferToThreadPool(self._reactor, self._pool, self._in_thread, work)
        running.addTimeout(CLIENT_DEADLINE, self._reactor)
        try:
            return await running  # type: ignore[no-any-return]
        except defer.TimeoutError:
            self._hung = True
            self._set_available(False)
            raise StoreUnavailable(f"PostgreSQL: no answer in {CLIENT_DEADLINE:g} s (the server hangs)") from None

    def start_in_reactor(self) -> None:
        """The pool alone (a CLI that skipped start(): migrate, tests)."""
        if not self._pool.started:
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)
        self._started = True

    def _wrote(self, change: int) -> None:
        with self._lock:
            self._floor = max(self._floor, change)
            if self._pending_change < self._floor:
                self._pending = None

    async def settle(self) -> None:
        """Wait (SETTLE_SECONDS; a stalled one until it is not live) until every live proxy's listener has read this
        process's last write; never raises. A move's begin waits before it reads anything, its end before its client
        is answered: any client's next command, through any proxy, finds the names held, then free."""
        behind = await self._behind(SETTLE_SECONDS, stalled=LIVE_SECONDS)
        if behind:
            log.warn("map store: {n} proxy listener(s) had not read change {c} after {s}s: {ids}", n=len(behind),
                     c=self._floor, s=SETTLE_SECONDS, ids=", ".join(behind))

    async def confirmed(self, seconds: float) -> bool:
        """Every live proxy has read and confirmed this process's last write within *seconds*
        (proxyappends.py: a RENAME's reservation, once their APPENDs under way to its names are answered)."""
        return not await self._behind(seconds)

    async def _behind(self, seconds: float, stalled: float = 0.0) -> list[str]:
        """The ids of the live listeners that have not said they read this process's last write, after *seconds*;
        up to *stalled* more while one of them has not beaten lately (stalled: waited for until it is no longer live,
        its proxy making no name by then, _watch; one that beats and stays behind holds a confirmation back)."""
        with self._lock:
            floor = self._floor
            if floor < 0 or not self.available or self._listener is None:
                return []
        deadline = time.monotonic() + seconds

        def wait_all(conn: psycopg.Connection[Any]) -> list[str]:
            while True:
                rows = conn.execute(
                    "SELECT id, beat > clock_timestamp() - make_interval(secs => %s) FROM listeners WHERE seen < %s"
                    " AND beat > clock_timestamp() - make_interval(secs => %s)", (QUIET_BEAT, floor, LIVE_SECONDS)).fetchall()
                gone = [str(r[0]) for r in rows if _listener_gone(str(r[0]))]
                if gone:  # a proxy killed on this host: nobody to wait for (its row would count as live for seconds)
                    conn.execute("DELETE FROM listeners WHERE id = ANY(%s)", (gone,))
                behind, quiet = [str(r[0]) for r in rows if str(r[0]) not in gone], any(not r[1] for r in rows)
                late = time.monotonic() - deadline
                if not behind or late > stalled or (late > 0 and not quiet):
                    return behind
                time.sleep(0.002)

        try:
            return await self._run(wait_all)
        except Exception as e:
            log.warn("map store: could not check that the other proxies have change {c}: {why}", c=floor, why=str(e))
            return []

    def poll(self) -> Snapshot | None:
        with self._lock:
            snapshot, self._pending = self._pending, None
        return snapshot

    async def load(self) -> Snapshot:
        def work(conn: psycopg.Connection[Any]) -> tuple[int, Snapshot]:
            check_schema(conn)
            return _snapshot_rows(conn)

        change, snapshot = await self._run(work)
        self._wrote(change)
        with self._lock:
            self._pending = None
        return snapshot

    async def placement(self, user: str, mailbox: str) -> tuple[str, ...] | None:
        row = await self._run(lambda conn: conn.execute("SELECT backends FROM placements WHERE username = %s AND "
                                                        "mailbox = %s", (_b(user), _b(mailbox))).fetchone())
        return None if row is None else tuple(row[0].split(","))

    async def set(self, user: str, mailbox: str, backends: tuple[str, ...]) -> None:
        def work(conn: psycopg.Connection[Any]) -> int:
            change = _bump(conn)
            conn.execute("INSERT INTO placements (username, mailbox, backends) VALUES (%s, %s, %s)"
                         " ON CONFLICT (username, mailbox) DO UPDATE SET backends = EXCLUDED.backends",
                         (_b(user), _b(mailbox), ",".join(backends)))
            return change

        self._wrote(await self._run(work))

    async def unset(self, user: str, mailbox: str) -> None:
        def work(conn: psycopg.Connection[Any]) -> int:
            change = _bump(conn)
            conn.execute("DELETE FROM placements WHERE username = %s AND mailbox = %s", (_b(user), _b(mailbox)))
            return change

        self._wrote(await self._run(work))

    async def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, owner: str,
                         separator: str) -> int:
        lease, text = self.lease_seconds, json.dumps(data)

        def work(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            change = _bump(conn)  # the row lock: every other begin/end waits until this one commits
            rows = conn.execute("SELECT name, subtree, shared FROM reservations WHERE username = %s",
                                (_b(user),)).fetchall()
            held = [Reservation(_s(n), bool(st), bool(sh)) for n, st, sh in rows]
            clash = [h for h in held if any(conflicts(h, r, separator) for r in reservations)]
            if clash:
                raise InUse(clash)
            row = conn.execute(
                "INSERT INTO journal (username, op, data, step, created, owner, lease_until)"
                " VALUES (%s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s)) RETURNING id",
                (_b(user), op, text, Step.RESERVED.value, time.time(), owner, lease)).fetchone()
            assert row is not None
            entry_id = int(row[0])
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO reservations (entry, username, name, subtree, shared) VALUES (%s, %s, %s, %s, %s)",
                    [(entry_id, _b(user), _b(r.name), r.subtree, r.shared) for r in reservations])
            return entry_id, change

        entry_id, change = await self._run(work)
        self._wrote(change)
        self._deltas.began(entry_id, text)
        return entry_id

    async def journal_step(self, entry_id: int, step: Step, data: dict, owner: str | None) -> None:
        lease = self.lease_seconds

        async def write(whole: bool, expected: int | None, text: str) -> int | None:
            return await self._run(lambda conn: write_step_row(conn, entry_id, step, owner, lease, whole, expected, text))

        if not await write_step(self._deltas, entry_id, data, write):
            raise LostEntry(f"journal entry {entry_id} is no longer ours (taken over by recovery, or gone)")

    async def end_move(self, entry_id: int) -> None:
        def work(conn: psycopg.Connection[Any]) -> int:
            change = _bump(conn)
            conn.execute("DELETE FROM reservations WHERE entry = %s", (entry_id,))
            conn.execute("DELETE FROM journal WHERE id = %s", (entry_id,))  # its journal_steps: ON DELETE CASCADE
            return change

        self._wrote(await self._run(work))
        self._deltas.forget(entry_id)

    async def claim(self, entry_id: int, owner: str, expected: str | None, dead: bool = False) -> bool:
        lease, free = self.lease_seconds, expected is None or dead

        def work(conn: psycopg.Connection[Any]) -> int:
            cur = conn.execute(
                "UPDATE journal SET owner = %s, lease_until = now() + make_interval(secs => %s)"
                " WHERE id = %s AND owner IS NOT DISTINCT FROM %s::text"
                " AND (%s::boolean OR lease_until IS NULL OR lease_until < now())",
                (owner, lease, entry_id, expected, free))
            return cur.rowcount

        return await self._run(work) == 1

    async def disown(self, entry_id: int, owner: str) -> bool:
        def work(conn: psycopg.Connection[Any]) -> int:
            return conn.execute("UPDATE journal SET owner = NULL, lease_until = NULL WHERE id = %s AND owner = %s",
                                (entry_id, owner)).rowcount

        self._deltas.forget(entry_id)  # whoever takes it next writes its first step whole
        return await self._run(work) == 1

    async def renew(self, owner: str, entry_ids: Sequence[int]) -> list[int]:
        lease, ids = self.lease_seconds, list(entry_ids)

        def work(conn: psycopg.Connection[Any]) -> list[int]:
            return [i for (i,) in conn.execute("UPDATE journal SET lease_until = now() + make_interval(secs => %s)"
                                               " WHERE owner = %s AND id = ANY(%s) RETURNING id",
                                               (lease, owner, ids)).fetchall()]

        return await self._run(work)

    async def journal(self) -> list[JournalEntry]:
        rows, steps = await self._run(read_journal)
        found = by_entry(steps)  # type: ignore[arg-type]
        return [JournalEntry(int(i), _s(u), o, rebuild(d, found.get(int(i), ())), read_step(st), ow, c,  # type: ignore[arg-type]
                             lease_expired=bool(x)) for i, u, o, d, st, c, ow, x in rows]

    async def journal_owners(self) -> list[tuple[int, str | None, bool]]:
        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute("SELECT id, owner, coalesce(lease_until < now(), false) FROM journal").fetchall()

        return [(int(i), ow, bool(x)) for i, ow, x in await self._run(work)]

    async def count_transfer(self, kind: str, result: str, nbytes: int) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute("INSERT INTO transfer_counts (kind, result, n, bytes) VALUES (%s, %s, 1, %s)"
                         " ON CONFLICT (kind, result) DO UPDATE SET n = transfer_counts.n + 1,"
                         " bytes = transfer_counts.bytes + EXCLUDED.bytes", (kind, result, int(nbytes)))

        await self._run(work)

    async def transfer_counts(self) -> TransferCounts:
        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute("SELECT kind, result, n, bytes FROM transfer_counts").fetchall()

        return {(k, r): (int(n), int(b)) for k, r, n, b in await self._run(work)}

    async def close(self) -> None:
        if self._started and self.available:  # out of `listeners` now: no settle() waits for a closed store
            self._stopping.set()  # (its own DELETE at the end comes only once notifies() returns)
            try:
                await self._run(lambda conn: conn.execute("DELETE FROM listeners WHERE id = %s", (self._id,)))
            except Exception as e:
                log.debug("map store: could not leave `listeners` ({why})", why=_why(e))
        self._stop_threads()  # idle threads end at once; a statement in flight ends within its timeout
