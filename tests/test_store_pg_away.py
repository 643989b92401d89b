"""PostgreSQL STOPPED (``pg_ctl stop -m fast``) or HUNG (SIGSTOPped) at the steps of a UID MOVE across,
back once the client is answered: the expectations of a locked SQLite file (test_store_locked.py),
judged by a census of the backends.

Seen on main (UID MOVE 1:* Work -> Shared/Dest across, PostgreSQL stopped after 'reserved'): the
client got NO, the entry's end failed, and the entry stayed at 'reserved' under the live proxy,
its lease renewed for good once the database was back: every later UID MOVE from Work answered
NO [INUSE] until the proxy restarted.
"""

from __future__ import annotations

import signal

import psycopg
import pytest
from test_several_proxies import _config
from test_store_hung import _server_pids, _signal
from test_store_locked import MOVE_AT, _wait_no_entries, run_with_store_away

pytestmark = pytest.mark.usefixtures("clean_mail")

# the UID MOVE's steps stopped (on main: 'reserved' held its names for good); one hung (a UID MOVE
# across had no test with the store away). RENAME: test_store_hung.py, test_several_proxies.py.
CASES = [("stopped", "UID MOVE", p) for p in MOVE_AT] + [("hung", "UID MOVE", "move-appending:1")]


@pytest.mark.parametrize("how, command, point", CASES, ids=[f"{h}-{c}-{p or 'begin'}" for h, c, p in CASES])
def test_postgresql_away(proxy_factory, fleet, postgres, pg_dsn, tmp_path, how, command, point):
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 2  # a move its process could not give up: taken over once it runs out
    stopped: list[int] = []

    def hold(proxy) -> None:
        if how == "stopped":
            postgres.stop()
        else:
            stopped.extend(_server_pids(postgres))
            _signal(stopped, signal.SIGSTOP)

    def release() -> None:
        if how == "stopped":
            postgres.start()
        else:
            _signal(stopped, signal.SIGCONT)

    def entries() -> list:
        try:
            with psycopg.connect(pg_dsn, connect_timeout=5) as conn:
                return conn.execute("SELECT id, op, step, owner FROM journal").fetchall()
        except psycopg.OperationalError:
            return ["(not up yet)"]

    run_with_store_away(proxy_factory, fleet, tmp_path, command, point, config, hold, release,
                        lambda proxy: _wait_no_entries(entries))
