"""One relayed MOVE of a mailbox at a time across the proxies that share one PostgreSQL map.

turns.py orders the MOVEs of one process and crossturns.py those of one master's workers; two
proxies (or hosts) on one map share neither, and two sessions, one on each, MOVEing one message
within one backend at once both succeeded at Dovecot (the message in both destinations:
tests/test_several_proxies_turn.py). Here a proxy holds a PostgreSQL session advisory lock per
mailbox while its MOVE runs, on one connection of its own: the server drops the locks of a proxy
that dies with its connection. Availability first: a database that does not answer within
TRY_SECONDS is passed over (the MOVE goes on as it would with one proxy) for PAUSE_SECONDS.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Any

import psycopg
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .journal import StoreUnavailable
from .pgstore import _connect
from .storethreads import StorePool
from .turns import Release

__all__ = ["PgTurns", "lock_id"]

log = Logger()

TRY_SECONDS = 1.0  # an attempt unanswered this long: the database is passed over
PAUSE_SECONDS = 5.0  # ... and not asked again for this long
POLL = 0.01  # seconds between attempts while another proxy holds the lock
_TRY = "SELECT pg_try_advisory_lock(%s)"
_UNLOCK = "SELECT pg_advisory_unlock(%s)"


def lock_id(key: Hashable) -> int:
    """The advisory lock's key: 64 bits of the key's hash (two RENAMEs' subtrees crossing on two
    colliding pairs of names could wait for each other: 64 bits make that vanish)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode("utf-8", "surrogateescape")).digest()[:8], "big",
                          signed=True)


def no_turn() -> None:
    """The release of a turn the database did not answer for."""


class PgTurns:
    """An exclusive lock per key between processes on one database: ``take`` fires with its release."""

    def __init__(self, dsn: str, reactor: Any) -> None:
        self.dsn, self.reactor = dsn, reactor
        self._pool = StorePool(minthreads=1, maxthreads=1, name="referral-proxy-turns")
        self._conn: psycopg.Connection[Any] | None = None  # used in the pool's one thread only
        self._skip_until = 0.0

    def _statement(self, sql: str, key: int) -> bool:
        """In the thread: one statement on our connection (made again after a loss)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = _connect(self.dsn)
            row = self._conn.execute(sql, (key,)).fetchone()
        except psycopg.Error as e:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            raise StoreUnavailable(f"PostgreSQL: {e}") from None
        return bool(row and row[0])

    def _run(self, sql: str, key: int) -> defer.Deferred[bool]:
        if not self._pool.started:
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return deferToThreadPool(self.reactor, self._pool, self._statement, sql, key)

    def _attempt(self, key: int) -> defer.Deferred[bool]:
        """One try, answered within TRY_SECONDS or failed; a lock granted after we stopped waiting
        (timed out, or the session gone) is given back."""
        answer: defer.Deferred[bool] = defer.Deferred()
        running = self._run(_TRY, key)

        def arrived(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if not answer.called:
                answer.callback(result) if isinstance(result, bool) else answer.errback(result)
            elif result is True:
                self._unlock(key)

        def late() -> None:
            if not answer.called:
                answer.errback(StoreUnavailable(f"PostgreSQL: no answer in {TRY_SECONDS:g} s"))

        timer = self.reactor.callLater(TRY_SECONDS, late)
        running.addBoth(arrived)
        return answer

    def _unlock(self, key: int) -> None:
        self._run(_UNLOCK, key).addErrback(lambda _f: None)  # (a connection lost has dropped the lock already)

    async def take(self, key: Hashable) -> Release:
        """Wait until no other process holds *key*'s lock, then hold it (or pass the database over)."""
        number = lock_id(key)
        while True:
            if self.reactor.seconds() < self._skip_until:
                return no_turn
            try:
                got = await self._attempt(number)
            except StoreUnavailable as e:
                self._skip_until = self.reactor.seconds() + PAUSE_SECONDS
                log.warn("MOVE turns between proxies passed over for {s:g} s: {why}", s=PAUSE_SECONDS, why=str(e))
                return no_turn
            if got:
                break
            await task.deferLater(self.reactor, POLL, lambda: None)
        freed = False

        def release() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._unlock(number)

        return release

    def close(self) -> None:
        """At the proxy's stop: the thread ends (not waited for long), the connection closes (and its locks)."""
        if self._pool.started:
            self._pool.stop(1.0)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
