"""The map store HUNG (PostgreSQL SIGSTOPped, longer than the store's deadline) under the admin's
`referral-proxy move`: the command ends in bounded time with a clear message and exit code, and once the database runs again
(SIGCONT) and `recover` ran, every message is there once, all moved or all where they were.
Judged by a census of the backends. Fixtures and helpers: test_store_hung.py.

Seen on main (`move carol Work b3`, 20 messages, PostgreSQL SIGSTOPped after 'copied'): the step's
write failed after the store's 17 s deadline, then `move` never ended (its thread pool joined the
thread still waiting for the stopped server) until the database ran again, 90 s later.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
from movecheck import census, judge, seed, start_paused, through_proxy, wait_paused
from test_several_proxies import RULES, _config, ids, recover_until_empty
from test_store_hung import _server_pids, _signal

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("step", ["copied:1", "committed:1"])
def test_postgresql_hung_under_an_admin_move(proxy_factory, fleet, postgres, pg_dsn, tmp_path, step):
    work = ids("work", 20)
    seed(fleet["b1"], "carol", "Work", work)
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 2
    proxy = proxy_factory(config, rules=RULES)
    pause = tmp_path / "pause"
    mover = start_paused(pause, step, "move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    assert wait_paused(pause, step) == step
    pids = _server_pids(postgres)
    _signal(pids, signal.SIGSTOP)
    try:
        (pause / "resume").touch()
        try:  # on main: no end until the database runs again (its threads joined at exit)
            out = mover.communicate(timeout=90)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            mover.kill()
            pytest.fail(f"`move` hung with the map store at {step}: " + mover.communicate()[0].decode(errors="replace"))
        assert mover.returncode == 1, out
        assert "PostgreSQL: no answer" in out and "run `referral-proxy recover`" in out, out  # why, what to run
        assert judge(census(fleet, "carol")[0], work)[0] == []  # nothing lost while the database is stopped
    finally:
        _signal(pids, signal.SIGCONT)
    recover_until_empty(proxy, pg_dsn)
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert len({where[i][0] for i in work}) == 1, where  # all where they were, or all moved
    reached = through_proxy(proxy, "carol")
    assert [i for i in work if reached[i] != 1] == []

