"""Lease fencing (fencing.py): a move's backend connection sends nothing once another process took its entry over.

Two processes on one PostgreSQL map (two MailboxMaps with owners of their own, lease 1 s). A begins an entry and
then renews nothing (stalled, or the database out of its reach): its lease runs out, B's recovery claims the entry.
On main, A went on sending the move's commands to the backends until its next journal write failed: two actors
draining one move (CI of 69b8dd2 saw it within one process, 30 messages lost from sight). The backend here is a
StringTransport: what A writes to it is what a backend would have run.
"""

from __future__ import annotations

import time

import pytest
from storehelp import REACTOR, now
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from referral_proxy.backend import BackendProtocol
from referral_proxy.config import BackendConfig, MapConfig
from referral_proxy.journal import LostEntry, Reservation
from referral_proxy.routing import MailboxMap

CONFIG = MapConfig(default="b1")
LEASE = 1.0


class _Elsewhere(MailboxMap):
    owner = "elsewhere.example:1:2"  # type: ignore[assignment]  # another host: never taken for dead by a pid check


@pytest.fixture
def maps(pg_dsn):
    from referral_proxy.pgstore import PostgresStore

    stores = [PostgresStore(pg_dsn, REACTOR, lease_seconds=LEASE) for _ in range(2)]
    for s in stores:
        s.start()
    yield _Elsewhere(CONFIG, stores[0]), MailboxMap(CONFIG, stores[1])
    for s in stores:
        now(s.close())


def _backend() -> BackendProtocol:
    conn = BackendProtocol(BackendConfig(name="b1", endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2"))
    conn.makeConnection(StringTransport())
    conn.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
    return conn


def _pump_until(done) -> None:
    """Run the store's answers (its threads call back through REACTOR) until *done()*."""
    deadline = time.monotonic() + 60
    while not done():
        f, args, kw = REACTOR.calls.get(timeout=max(0.1, deadline - time.monotonic()))
        f(*args, **kw)


def _take_over(b: MailboxMap, entry_id: int) -> None:
    deadline = time.monotonic() + 30  # A renews nothing: its lease runs out on the database's clock
    while time.monotonic() < deadline:
        (seen,) = [e for e in now(b.entries()) if e.id == entry_id]
        if b.abandoned(seen):
            break
        time.sleep(0.05)
    assert now(b.claim(seen)), "B could not claim an entry whose lease ran out"


def test_a_fresh_lease_sends_at_once_and_a_stale_one_is_renewed_first(maps):
    a, b = maps
    entry = now(a.begin_move("carol", "move", [Reservation("Work")], {}))
    conn = _backend()
    a.fences.guard(conn, entry)
    conn.command(b"NOOP")
    assert conn.transport.value() == b"rp1 NOOP\r\n"  # begun just now: no round trip to the store
    conn.transport.clear()
    time.sleep(LEASE * 0.6)  # past half the lease since begin_move was sent
    conn.command(b'DELETE "Work"')
    assert conn.transport.value() == b""  # held until the store says the entry is still A's
    _pump_until(lambda: conn.transport.value() != b"")
    assert conn.transport.value() == b'rp2 DELETE "Work"\r\n'
    (seen,) = now(b.entries())
    assert not b.abandoned(seen) and not now(b.claim(seen))  # that renewal holds B off


def test_a_taken_over_entry_sends_nothing_more_and_says_why(maps):
    a, b = maps
    entry = now(a.begin_move("carol", "move", [Reservation("Work")], {}))
    conn = _backend()
    a.fences.guard(conn, entry)
    now(a.fences.proven(entry))  # fresh: at once (a local RENAME's or a DELETE's own check before it is sent)
    _take_over(b, entry.id)
    with pytest.raises(LostEntry):
        now(a.fences.proven(entry))
    answer = conn.command(b'DELETE "Work"')
    conn.command(b"EXPUNGE")
    _pump_until(lambda: conn.fenced_out is not None)
    assert conn.transport.value() == b"" and conn.transport.disconnecting  # nothing reached the backend
    assert isinstance(conn.fenced_out, LostEntry)
    conn.connectionLost(Failure(ConnectionDone()))
    failures: list[Failure] = []
    answer.addErrback(failures.append)
    assert failures and failures[0].check(LostEntry)  # the mover is told why: recovery took it over


def test_an_ended_entry_and_a_store_without_leases_never_wait(maps, tmp_path):
    a, _b = maps
    entry = now(a.begin_move("carol", "move", [Reservation("Work")], {}))
    now(a.end_move(entry))
    time.sleep(LEASE * 0.6)
    assert a.fences.check(entry) is None  # its connections' last LOGOUT goes out
    from referral_proxy.store import SQLiteStore

    store = SQLiteStore(tmp_path / "map.sqlite3")
    store.start()
    local = MailboxMap(CONFIG, store)
    other = now(local.begin_move("carol", "move", [Reservation("Work")], {}))
    time.sleep(LEASE * 0.6)
    assert local.fences.check(other) is None  # SQLite: an owner is taken over only once dead
    now(store.close())
