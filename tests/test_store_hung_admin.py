"""The map store HUNG (PostgreSQL SIGSTOPped, longer than the store's deadline) under the admin's
`referral-proxy move` (and under a MULTIAPPEND the proxy stages): the command ends in bounded time
with a clear message and exit code (the client gets an answer), and once the database runs again
(SIGCONT) and `recover` ran, every message is there once, all moved or all where they were
(an APPEND's: all if it said OK, none if NO).
Judged by a census of the backends. Fixtures and helpers: test_store_hung.py.

Seen on main (`move carol Work b3`, 20 messages, PostgreSQL SIGSTOPped after 'copied'): the step's
write failed after the store's 17 s deadline, then `move` never ended (its thread pool joined the
thread still waiting for the stopped server) until the database ran again, 90 s later.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess

import pytest
from imapwire import Wire
from mailcheck import contents
from movecheck import census, faulty, judge, seed, start_paused, through_proxy, wait_paused
from test_multiappend_rfc import _limited, _mailboxes
from test_several_proxies import RULES, _config, ids, recover_until_empty
from test_store_hung import _answer, _server_pids, _signal

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER
from referral_proxy.staging import STAGING_PREFIX

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


@pytest.fixture(scope="module")
def no_multiappend():
    d = _limited("hung-nomulti", "127.0.0.41", "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT "
                 "NAMESPACE CHILDREN MOVE")  # the proxy stages a MULTIAPPEND there
    d.start()
    yield d
    d.stop()


def test_postgresql_hung_in_the_middle_of_a_staged_multiappend(proxy_factory, no_multiappend, postgres, pg_dsn,
                                                                tmp_path):
    """Held on main (hung at 'reserved' too: NO [UNAVAILABLE], nothing appended): after 'staging' the
    messages are staged and committed without the store, then the entry's end hangs; the client's
    next command waits for it, bounded, and recovery ends the entry once the database runs again."""
    step = "staging:1"
    backend = no_multiappend
    backend.reset_mail("alice")
    with backend.client("alice") as m:
        m.create("Target")
    config = {"backends": {"x": {"endpoint": backend.endpoint, "url": backend.url, "master_user": MASTER_USER,
                                 "master_password": MASTER_PASSWORD}},
              "map": {"default": "x", "store": pg_dsn, "lease_seconds": 2}}
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(config, command=faulty("--pause-at", step, "--pause-dir", str(pause)))
    bodies = [b"Subject: hung %d\r\n\r\n%s\r\n" % (i, b"h" * 2000) for i in range(3)]
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("alice")
    w.send(b"a APPEND Target" + b"".join(b" {%d+}\r\n" % len(b) + b for b in bodies) + b"\r\n")
    assert wait_paused(pause, step) == step
    pids = _server_pids(postgres)
    _signal(pids, signal.SIGSTOP)
    try:
        (pause / "resume").touch()
        reply = _answer(w, b"a", 90)
        assert reply[-1].startswith(b"a OK [APPENDUID "), reply  # the commit needs no store
        w.send(b"n NOOP\r\n")
        after = _answer(w, b"n", 90)  # the session goes on
        assert after[-1].startswith(b"n OK"), after
    finally:
        _signal(pids, signal.SIGCONT)
    w.close()
    recover_until_empty(proxy, pg_dsn)
    want = sorted(hashlib.sha256(b).hexdigest() for b in bodies) if reply[-1].startswith(b"a OK") else []
    assert sorted(c[3] for c in contents(backend, "alice", "Target")) == want, reply
    assert not any(STAGING_PREFIX in name for name in _mailboxes(backend, "alice"))
