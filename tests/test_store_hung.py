"""The map store HUNG (PostgreSQL's postmaster and backends SIGSTOPped, longer than the lease) in
the middle of a RENAME across: the client gets a clear answer while the database is still stopped,
never a hang; once it is back (SIGCONT) and recovery ran, every message is there once.

A stopped server answers nothing yet the kernel keeps its sockets open (keepalive probes are
answered, and a Unix socket has none): the server's own statement_timeout never fires, so only a
deadline on the proxy's side bounds the wait. Judged by a census of the backends.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import census, faulty, judge, seed, through_proxy, wait_paused
from test_several_proxies import RULES, _config, _logged_in, ids, recover_until_empty

pytestmark = pytest.mark.usefixtures("clean_mail")


def _server_pids(postgres) -> list[int]:
    """The postmaster and every process it started (its backends, the checkpointer ...)."""
    master = int((Path(postgres.data) / "postmaster.pid").read_text().split()[0])
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == master]
    return [master, *children]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _answer(wire: Wire, tag: bytes, bound: float) -> list[bytes]:
    """The lines up to *tag*'s completion, or what came before *bound* seconds passed (a hang)."""
    lines: list[bytes] = []
    give_up = time.monotonic() + bound
    wire.sock.settimeout(1.0)
    while time.monotonic() < give_up:
        try:
            lines.append(wire.line())
        except TimeoutError:
            continue
        if lines[-1].startswith(tag + b" "):
            break
    wire.sock.settimeout(120)
    return lines or [b"(nothing)"]


@pytest.mark.parametrize("step", ["copied:1", "committed:1"])
def test_postgresql_hung_in_the_middle_of_a_rename(proxy_factory, fleet, postgres, pg_dsn, tmp_path, step):
    work, other = ids("work", 30), ids("other", 3)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "bob", "Shared/Old", other)
    pause = tmp_path / "pause"
    pause.mkdir()
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 2
    a = proxy_factory(config, rules=RULES, command=faulty("--pause-at", step, "--pause-dir", str(pause)))
    b = proxy_factory(config, rules=RULES)
    on_a = _logged_in(a)
    bystander = _logged_in(a, "bob")
    on_a.send(b"r RENAME Work Shared/Work\r\n")
    assert wait_paused(pause, step) == step
    pids = _server_pids(postgres)
    _signal(pids, signal.SIGSTOP)
    try:
        (pause / "resume").touch()
        reply = _answer(on_a, b"r", 90)  # on main: stay-alive lines only, until the database runs again
        assert reply[-1].startswith((b"r NO", b"r OK")), reply
        # other users are routed from the cache meanwhile
        selected = bystander.cmd(b"s", b"SELECT Shared/Old")
        assert selected[-1].startswith(b"s OK") and b"* 3 EXISTS\r\n" in selected, selected
        late = Wire(a.host, a.port, timeout=120)
        late.login("bob")
        assert late.cmd(b"s", b"STATUS Shared/Old (MESSAGES)")[0] == b"* STATUS Shared/Old (MESSAGES 3)\r\n"
        late.close()
        counts, _where = census(fleet, "carol")
        assert judge(counts, work)[0] == []  # nothing lost while the database is stopped
    finally:
        _signal(pids, signal.SIGCONT)
    on_a.close()
    bystander.close()
    recover_until_empty(b, pg_dsn)  # the lease runs out; then recovery (B's configuration) finishes or undoes it
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert len({where[i][0] for i in work}) == 1, where  # all where they were, or all moved
    for proxy in (a, b):
        reached = through_proxy(proxy, "carol")
        assert [i for i in work if reached[i] != 1] == [], proxy.port
