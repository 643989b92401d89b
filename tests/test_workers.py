"""``[proxy] workers = N``: a master that binds the listeners and N worker processes that
accept on them (referral_proxy.workers), against the real Dovecot fleet: both workers
serve and the master none, SIGHUP and SIGTERM reach every worker, a worker that dies is
started again while the others serve on, workers end with their master, per-worker
metrics ports, the same under twistd; the configuration key.  Mail handling as with one
process: two RENAMEs of one mailbox on two workers at once (one wins, census exact), a
worker killed in a move (the master recovers it, census exact)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from imapwire import Wire, wait_for
from movecheck import census, judge, seed, through_proxy

from referral_proxy.config import ConfigError, parse_config
from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, free_port
from referral_proxy.workers import ENV, metrics_listen, worker_role

REPO = Path(__file__).resolve().parent.parent


def workers_of(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]


def holder(pids: list[int], wire: Wire) -> int | None:
    """The process whose socket is the other end of *wire*."""
    port = wire.sock.getsockname()[1]
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.raddr and c.raddr.port == port for c in conns):
            return pid
    return None


def one_on_each(proxy, master: int, user: str = "alice") -> dict[int, Wire]:
    """A logged-in connection held by each worker (connections are opened until every worker
    took one; the others are closed); the master must hold none."""
    pids = [p.pid for p in wait_for(lambda: len(workers_of(master)) == 2 and workers_of(master), "2 workers")]
    found: dict[int, Wire] = {}
    for _ in range(300):
        w = Wire(proxy.host, proxy.port)
        w.login(user, proxy.users[user])
        pid = holder(pids + [master], w)
        assert pid != master, "the master accepted a client connection"
        if pid in pids and pid not in found:
            found[pid] = w
            if len(found) == len(pids):
                return found
        else:
            w.close()
    raise AssertionError(f"connections landed on {sorted(found)} only, of workers {pids}")


@pytest.fixture
def two_workers(proxy_factory, clean_mail):
    proxy = proxy_factory(workers=2)
    wait_for(lambda: len(workers_of(proxy.pid)) == 2, "2 workers")
    return proxy


def test_both_workers_serve_and_the_master_accepts_nothing(two_workers, fleet):
    proxy = two_workers
    wires = one_on_each(proxy, proxy.pid)
    for i, w in enumerate(wires.values()):
        assert w.cmd(b"c", b"CREATE Worker%d" % i)[-1].startswith(b"c OK")
        body = b"Subject: w%d\r\n\r\nfrom worker %d\r\n" % (i, i)
        w.send(b"a APPEND Worker%d {%d+}\r\n%s\r\n" % (i, len(body), body))
        assert w.until_tagged(b"a")[-1].startswith(b"a OK [APPENDUID")
    with fleet["b1"].client("alice") as m:  # the census, on the backend itself
        for i in range(2):
            m.select(f"Worker{i}")
            typ, data = m.fetch("1:*", "(BODY.PEEK[TEXT])")
            assert typ == "OK" and len([d for d in data if isinstance(d, tuple)]) == 1
            assert data[0][1] == b"from worker %d\r\n" % i


def test_sighup_and_sigterm_reach_every_worker(two_workers, fleet):
    proxy = two_workers
    wires = one_on_each(proxy, proxy.pid)
    config = proxy.config_path.read_text()
    proxy.config_path.write_text(config + '\n[[map.rules]]\nuser = "alice"\nmailbox = "Hup*"\nbackend = "b2"\n')
    before = proxy.stderr_text().count("reloaded backends and map rules")
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.stderr_text().count("reloaded backends and map rules") >= before + 2, "both workers reloaded")
    for i, w in enumerate(wires.values()):
        assert w.cmd(b"c", b"CREATE Hup%d" % i)[-1].startswith(b"c OK")
    with fleet["b2"].client("alice") as m:
        names = {line.decode().rsplit(" ", 1)[-1].strip('"') for line in m.list()[1]}
    assert {"Hup0", "Hup1"} <= names, names
    with fleet["b1"].client("alice") as m:
        names = {line.decode().rsplit(" ", 1)[-1].strip('"') for line in m.list()[1]}
    assert not {"Hup0", "Hup1"} & names

    pids = list(wires)
    proxy.send_signal(signal.SIGTERM)
    for w in wires.values():
        assert w.line() == b"* BYE Server shutting down\r\n"
    assert proxy.process.wait(30) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_worker_that_dies_is_started_again_and_all_end_with_the_master(two_workers):
    proxy = two_workers
    wires = one_on_each(proxy, proxy.pid)
    victim, survivor = list(wires)
    os.kill(victim, signal.SIGKILL)
    assert wires[victim].closed()
    assert wires[survivor].cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    wait_for(lambda: {p.pid for p in workers_of(proxy.pid)} - {victim, survivor}, "a new worker")
    again = one_on_each(proxy, proxy.pid)  # the new one serves too
    assert victim not in again and survivor in again
    assert "starting it again" in proxy.stderr_text()

    pids = [p.pid for p in workers_of(proxy.pid)]
    proxy.kill()  # SIGKILL: the master tells no one; its workers see their pipe from it end
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids),
             "workers gone")


# -- mail handling is the same as with one process: the journal and its reservations are in the store --------

MOVES = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
SHARED_ON_B3 = [{"mailbox": "Shared/*", "backend": "b3"}]


def _journal(proxy) -> int:
    with sqlite3.connect(proxy.config_path.parent / "map.sqlite3") as db:
        return db.execute("SELECT count(*) FROM journal").fetchone()[0]


def _exactly_once_reachable(fleet, proxy, user: str, must: list[str]) -> dict:
    counts, where = census(fleet, user)
    assert judge(counts, must) == ([], []), (counts, where)
    reached = through_proxy(proxy, user)
    assert all(reached[i] == 1 for i in must), reached
    return where


def test_two_workers_rename_the_same_mailbox_at_once_one_wins(proxy_factory, fleet, clean_mail):
    work = [f"work-{i}@t" for i in range(300)]
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MOVES, rules=SHARED_ON_B3, workers=2)
    wires = list(one_on_each(proxy, proxy.pid, "carol").values())  # one RENAME in each worker
    start, answers = threading.Barrier(2), [b"", b""]

    def run(i: int) -> None:
        wires[i].sock.settimeout(120)
        start.wait()
        answers[i] = wires[i].cmd(b"r%d" % i, b"RENAME Work Shared/%s" % b"AB"[i:i + 1])[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert sum(a.split()[1:2] == [b"OK"] for a in answers) == 1, answers
    assert any(b"NO [INUSE]" in a or b"NO [NONEXISTENT]" in a for a in answers), answers
    where = _exactly_once_reachable(fleet, proxy, "carol", work)
    assert len({where[i][0] for i in work}) == 1 and where[work[0]][0][0] == "b3", where[work[0]]
    assert _journal(proxy) == 0


def test_a_worker_killed_in_a_move_has_it_recovered_by_the_master(proxy_factory, fleet, clean_mail):
    big = [f"big-{i}@t" for i in range(1500)]
    seed(fleet["b1"], "carol", "Big", big, size=400)
    proxy = proxy_factory(MOVES, rules=SHARED_ON_B3, workers=2)
    wires = one_on_each(proxy, proxy.pid, "carol")
    victim, w = next(iter(wires.items()))
    w.send(b"r RENAME Big Shared/Big\r\n")
    deadline = time.monotonic() + 60
    while _journal(proxy) == 0:  # the move's entry, written by the victim (it owns it)
        assert time.monotonic() < deadline, "no journal entry"
        time.sleep(0.002)
    os.kill(victim, signal.SIGKILL)
    assert w.closed(30)
    wait_for(lambda: _journal(proxy) == 0, "the master recovered the dead worker's move", timeout=120)
    assert "recovery: carol: Big -> Shared/Big" in proxy.stderr_text(), proxy.stderr_text()[-3000:]
    where = _exactly_once_reachable(fleet, proxy, "carol", big)
    assert len({where[i][0] for i in big}) == 1, "the mailbox was split"


def test_each_worker_serves_metrics_on_the_port_plus_its_index(proxy_factory, clean_mail):
    for _ in range(50):
        port = free_port("127.0.0.1")
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            continue
    proxy = proxy_factory({"metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, workers=2)
    wires = one_on_each(proxy, proxy.pid)
    served = []
    for k in range(2):
        text = wait_for(lambda k=k: _get(f"http://127.0.0.1:{port + k}/metrics"), "metrics")
        served.append(text)
    # every worker counts its own session: each has exactly one logged-in session open
    for text in served:
        assert "referral_proxy_sessions 1.0" in text, text[:2000]
    assert len(wires) == 2


def _get(url: str) -> str | None:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None


def test_under_twistd_too(tmp_path, fleet, clean_mail):
    port = free_port("127.0.0.1")
    path = tmp_path / "p.toml"
    path.write_text(f'[proxy]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\nworkers = 2\n[backends.b1]\n'
                    f'endpoint = "{fleet["b1"].endpoint}"\nurl = "{fleet["b1"].url}"\n[map]\ndefault = "b1"\n'
                    '[log]\nformat = "json"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    twistd = subprocess.Popen(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "--pidfile=", "-n", "referral-proxy", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        wait_for(lambda: twistd.poll() is None and len(workers_of(twistd.pid)) == 2 or twistd.poll(), "2 workers")
        assert twistd.poll() is None

        class _Proxy:
            host, users = "127.0.0.1", {"alice": "secret"}

        _Proxy.port = port
        wires = one_on_each(_Proxy, twistd.pid)
        for w in wires.values():
            w.send(b"z LOGOUT\r\n")
            w.until_tagged(b"z")
    finally:
        twistd.send_signal(signal.SIGTERM)
        out, err = twistd.communicate(timeout=60)
    events = [json.loads(line) for line in out.decode().splitlines()]  # the workers' lines too: every one JSON
    assert sum(e["event"] == "session_end" and e["outcome"] == "logout" for e in events) >= 2, events
    assert twistd.returncode in (0, -signal.SIGTERM), err  # twistd ends by the signal that stopped it


def _config(**proxy):
    return parse_config({"proxy": {"listen": ["tcp:1143"], **proxy},
                         "backends": {"b1": {"endpoint": "tcp:host=h:port=1", "url": "imap://h"}},
                         "map": {"default": "b1"}}, base=Path("."))


def test_the_workers_key():
    assert _config().proxy.workers == 1
    assert _config(workers=3).proxy.workers == 3
    assert _config(workers="auto").proxy.workers == len(os.sched_getaffinity(0))
    for bad in (0, -1, "many", 1.5, True, 10_000):
        with pytest.raises(ConfigError, match="proxy.workers"):
            _config(workers=bad)


def test_workers_refuse_a_listener_they_cannot_share(tmp_path):
    from twisted.internet import reactor

    from referral_proxy.service import check_endpoints

    config = parse_config({"proxy": {"listen": [f"unix:{tmp_path}/s"], "workers": 2},
                           "backends": {"b1": {"endpoint": "tcp:host=h:port=1", "url": "imap://h"}},
                           "map": {"default": "b1"}}, base=Path("."))
    with pytest.raises(ConfigError, match=r"proxy.listen\[0\]: workers share TCP listeners only"):
        check_endpoints(config, reactor)


def test_worker_role_and_metrics_ports():
    assert worker_role({}) is None
    role = worker_role({ENV: "1:4:3/2,4/10"})
    assert (role.index, role.count, role.listeners) == (1, 4, ((3, 2), (4, 10)))
    assert metrics_listen("tcp:9143:interface=127.0.0.1", 2) == "tcp:9145:interface=127.0.0.1"
    assert metrics_listen("tcp:port=9143:interface=127.0.0.1", 1) == "tcp:port=9144:interface=127.0.0.1"
    assert metrics_listen("tcp:0:interface=127.0.0.1", 3) == "tcp:0:interface=127.0.0.1"
