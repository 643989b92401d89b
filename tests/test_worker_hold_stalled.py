"""A RENAME asks the other workers of its master to hold (workerholds.py): one that never answers
(stopped) or dies meanwhile costs it a bounded wait, never a hang, and the other worker's session
goes on afterwards. Real master, workers and Dovecot."""

from __future__ import annotations

import os
import signal
import time

import pytest
from imapwire import Wire, wait_for
from test_workers import one_on_each

from referral_proxy.workerholds import ASK_WAIT

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"user": "alice", "mailbox": "*", "backend": "b1"}]


def _rename_while_stopped(renamer: Wire, pid: int, then: str) -> tuple[bytes, float]:
    """*renamer*'s RENAME Stall Stalled while process *pid* is stopped (and, *then* "killed", SIGKILLed
    1 s into it; else continued after): its answer, and the seconds it took."""
    os.kill(pid, signal.SIGSTOP)
    try:
        renamer.sock.settimeout(ASK_WAIT + 20)
        began = time.monotonic()
        if then == "killed":
            renamer.sock.sendall(b"r RENAME Stall Stalled\r\n")
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            answer = renamer.until_tagged(b"r")[-1]
        else:
            answer = renamer.cmd(b"r", b"RENAME Stall Stalled")[-1]
        return answer, time.monotonic() - began
    finally:
        if then == "continued":
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("then", ["continued", "killed"])
def test_a_stopped_worker_delays_a_rename_at_most_ask_wait(proxy_factory, fleet, then):
    proxy = proxy_factory(rules=RULES, workers=2)
    wires = one_on_each(proxy, proxy.pid)
    (_, renamer), (other_pid, other) = sorted(wires.items())
    assert renamer.cmd(b"c", b"CREATE Stall")[-1].startswith(b"c OK")
    assert other.cmd(b"s", b"STATUS Stall (MESSAGES)")[-1].startswith(b"s OK")  # alice's session there
    answer, took = _rename_while_stopped(renamer, other_pid, then)  # killed: the master stops waiting for it
    assert answer.startswith(b"r OK"), answer
    assert took < ASK_WAIT + 10, took  # (bounded: ASK_WAIT, or the master seeing the worker die)
    if then == "continued":
        assert took >= ASK_WAIT - 0.5, took  # it did wait for the stopped worker
        wait_for(lambda: "did not all hold within" in proxy.stderr_text(), "the RENAME's warning")
        other.sock.settimeout(30)  # its hold (for the RENAME already over) ends: it goes on
        assert other.cmd(b"s", b"STATUS Stalled (MESSAGES)")[-1].startswith(b"s OK")
    else:  # not waited for once dead (the master stops waiting for it; its restarted self says it holds)
        assert took < ASK_WAIT - 0.5, took
    fresh = Wire(proxy.host, proxy.port, timeout=30)
    fresh.login("alice")
    listed = b"".join(fresh.cmd(b"l", b'LIST "" "Stall*"'))
    assert b' "Stalled"\r\n' in listed and b' "Stall"\r\n' not in listed, listed


@pytest.mark.parametrize("then", ["continued", "killed"])
def test_a_stopped_proxy_on_the_same_sqlite_file_delays_a_rename_at_most_ask_wait(proxy_factory, fleet, tmp_path,
                                                                                 then):
    """The same between two separate proxies on one SQLite map file (peerholds.py): the other proxy
    stopped, or killed while the RENAME waits for it (its socket closes with it)."""
    config = {"map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    proxy, stalled = proxy_factory(config, rules=RULES), proxy_factory(config, rules=RULES)
    renamer, other = Wire(proxy.host, proxy.port, timeout=30), Wire(stalled.host, stalled.port, timeout=30)
    renamer.login("alice")
    other.login("alice")
    assert renamer.cmd(b"c", b"CREATE Stall")[-1].startswith(b"c OK")
    assert other.cmd(b"s", b"STATUS Stall (MESSAGES)")[-1].startswith(b"s OK")  # alice's session there
    answer, took = _rename_while_stopped(renamer, stalled.pid, then)
    assert answer.startswith(b"r OK"), answer
    if then == "continued":
        assert ASK_WAIT - 0.5 <= took < ASK_WAIT + 10, took  # it did wait for the stopped proxy, and no longer
        wait_for(lambda: "did not all hold within" in proxy.stderr_text(), "the RENAME's warning")
        other.sock.settimeout(30)  # its hold, asked once it runs again, ends with the connection: it goes on
        assert other.cmd(b"s", b"STATUS Stalled (MESSAGES)")[-1].startswith(b"s OK")
    else:  # its socket closed with it: not waited for
        assert took < ASK_WAIT - 0.5, took
    listed = b"".join(renamer.cmd(b"l", b'LIST "" "Stall*"'))
    assert b' "Stalled"\r\n' in listed and b' "Stall"\r\n' not in listed, listed
