"""A cross-server UID MOVE whose copies commit after recovery took its entry over (latecommit.py; probe k1 of
stop 59, 4 of 4: every message in both mailboxes).

Fencing keeps a stale owner from sending; bytes it sent before are beyond it. Here the destination's imap
process serving the MOVE is stopped while the MULTIAPPEND's last byte is on its way (a partition, a stalled
Dovecot), the proxy itself is stopped past its lease (1 s), and `recover` claims the entry, looks for the copies
by content, finds none (not committed yet) and releases it, the sources kept. Then Dovecot commits, the proxy goes
on, reads APPENDUID and loses the entry at its next journal write: on main it answered NO and left the copies
(each message twice). Now it waits for the entry's end, sees the sources still there and takes their copies
back. Real Dovecot and PostgreSQL; judged by census.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, judge, seed, wait_paused
from test_several_proxies import _config, ids, recover_until_empty
from test_store_hung import _signal

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("late", [True, False], ids=["after-recovery-looked", "before-recovery-looked"])
def test_copies_committed_after_recovery_kept_the_sources_are_taken_back(proxy_factory, fleet, pg_dsn, tmp_path, late):
    """late=False: Dovecot commits before `recover` looks: it finds the copies and finishes the move (the sources
    expunged); the proxy, back, must then keep its copies (the only ones left)."""
    work = ids("late", 40)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/W", [])
    pause = tmp_path / "pause"
    pause.mkdir()
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 1
    a = proxy_factory(config, rules=[{"mailbox": "Shared/*", "backend": "b3"}],
                      command=faulty("--pause-at", "move-appending:2", "--pause-dir", str(pause)))
    w = Wire(a.host, a.port, timeout=180)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:* Shared/W\r\n")
    assert wait_paused(pause, "move-appending:2") == "move-appending:2"  # the hashes are written
    stalled = fleet["b3"].sessions("carol")  # the MOVE's own connection to b3 among them
    assert stalled
    _signal(stalled, signal.SIGSTOP)
    proxy_stopped = False
    try:
        (pause / "resume").touch()  # the last byte goes: it waits in the stopped imap process's socket
        time.sleep(0.5)  # not a measurement: the proxy writes it
        os.kill(a.process.pid, signal.SIGSTOP)
        proxy_stopped = True
        if not late:
            _signal(stalled, signal.SIGCONT)
        time.sleep(3)  # not a measurement: three leases of 1 s run out (and, not late, Dovecot commits)
        taken = cli("recover", "--config", str(a.config_path))
        assert taken.returncode == 0 and "carol" in taken.stdout, taken.stdout + taken.stderr
    finally:
        _signal(stalled, signal.SIGCONT)  # Dovecot commits the copies
        time.sleep(0.5)
        if proxy_stopped:
            os.kill(a.process.pid, signal.SIGCONT)
    answer = w.until_tagged(b"m")[-1]
    assert answer.startswith(b"m NO [UNAVAILABLE]") and b"recovery took the operation over" in answer, answer
    w.close()
    recover_until_empty(a, pg_dsn)
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []), (taken.stdout, {i: where[i] for i in work[:3]})
    kept = ("b1", "Work") if late else ("b3", "Shared/W")  # recovery kept the sources, or finished the move
    assert {m for i in work for m in where[i]} == {kept}, taken.stdout
