"""A client's command at the source backend past a move's commit point (drain.py): each message once.

A command relayed an instant before the move's reservation landed can run at the backend
long after (a slow command, a lock wait, a stopped process): past COMMITTED, while the move
drains the source. Seen before drain.py: a client's UID MOVE 7 INBOX in Work, run then, left
the message in INBOX on b1 and (the move's copy) in Work on b3; an EXPUNGE'd one came back.
Here the command is sent straight to the source backend while the move is paused at a
journal step, or -- the window between the drain's own removal and its answer -- while a
relay in front of b1 holds the move's removing command. Judged by a census of the backends.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

import pytest
from createrelay import Relay
from movecheck import LEFT_TO_RECOVER, REPO, census, cli, faulty, journal_store, seed, start_paused, wait_paused
from storehelp import now
from test_moves import MASTERS, RULES, _exactly_once, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def _uid_of(m, mid: str) -> bytes:
    typ, data = m.uid("SEARCH", "HEADER", "Message-Id", mid)
    assert typ == "OK" and len(data[0].split()) == 1, data
    return data[0]


def _client_moves(fleet, box: str, mid: str, to: str = "INBOX") -> None:
    """The client's command that was already at b1: UID MOVE within the backend."""
    with fleet["b1"].client("carol") as m:
        m.select(box)
        typ, data = m.uid("MOVE", _uid_of(m, mid), to)
        assert typ == "OK", data


def _client_expunges(fleet, box: str, mid: str) -> None:
    with fleet["b1"].client("carol") as m:
        m.select(box)
        uid = _uid_of(m, mid)
        assert m.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert m.uid("EXPUNGE", uid)[0] == "OK"


def _paused_move(proxy, tmp_path, point: str, what: str = "Work"):
    """``move carol WHAT b3`` stopped at journal step *point* (resume with _resume)."""
    pause = tmp_path / "pause"
    proc = start_paused(pause, point, "move", "--config", str(proxy.config_path), "carol", what, "b3")
    wait_paused(pause, point)
    return proc, pause


def _once(fleet, proxy, must) -> dict:
    """Each of *must* once on the backends and through the proxy, nothing else: where each one is."""
    _exactly_once(fleet, proxy, "carol", must)
    return census(fleet, "carol")[1]


def _resume(proc, pause) -> str:
    (pause / "resume").touch()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out.decode()


@pytest.mark.parametrize("what", ["Work", "*"])
def test_a_message_moved_within_the_source_after_the_commit_point_is_there_once(proxy_factory, fleet, tmp_path,
                                                                                 what):
    inbox, work = ids("inbox", 3), ids("work", 6)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    proc, pause = _paused_move(proxy, tmp_path, "committed:1", what)
    try:
        _client_moves(fleet, "Work", work[2])
    finally:
        out = _resume(proc, pause)
    where = _once(fleet, proxy, inbox + work)
    assert where[work[2]] == [("b3" if what == "*" else "b1", "INBOX")], (where[work[2]], out)
    assert {where[i][0] for i in work if i != work[2]} == {("b3", "Work")}
    assert _no_entries(proxy)


def test_a_message_expunged_in_the_source_after_the_commit_point_does_not_come_back(proxy_factory, fleet, tmp_path):
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    proc, pause = _paused_move(proxy, tmp_path, "placed:1")
    try:
        _client_expunges(fleet, "Work", work[0])
    finally:
        _resume(proc, pause)
    where = _once(fleet, proxy, work[1:])
    assert where[work[0]] == [] and all(where[i] == [("b3", "Work")] for i in work[1:]), where


class _Holder(Relay):
    """A TCP relay in front of a backend that holds the first client line matching *pattern*
    until released (as a slow or stopped backend process would keep it): ``held`` is set then."""

    def __init__(self, host: str, port: int, pattern: bytes) -> None:
        super().__init__(host, port)
        self.pattern = re.compile(pattern)
        self.held, self.release = threading.Event(), threading.Event()
        self.line = b""

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        pending = b""
        try:
            while data := src.recv(65536):
                if watch and not self.held.is_set():
                    pending += data
                    *lines, pending = pending.split(b"\r\n")
                    for line in lines:
                        if not self.held.is_set() and self.pattern.search(line):
                            self.line = line
                            self.held.set()
                            self.release.wait(120)
                        dst.sendall(line + b"\r\n")
                    if self.held.is_set() and pending:
                        dst.sendall(pending)
                        pending = b""
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.mark.parametrize("command", ["move", "expunge"])
def test_a_clients_command_between_the_drains_removal_and_its_answer(proxy_factory, fleet, tmp_path, command):
    """The move's own removal of the verified UIDs (main: UID STORE \\Deleted, then UID EXPUNGE;
    now: UID MOVE to a private mailbox) held at b1 while a client's command takes one away."""
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    b1 = fleet["b1"]
    holder = _Holder(b1.host, b1.port, rb"^\S+ UID (EXPUNGE|MOVE) ")
    holder.start()
    config = proxy.config_path.with_name("held.toml")
    config.write_text(proxy.config_path.read_text().replace(b1.endpoint, f"tcp:host=127.0.0.1:port={holder.port}"))
    proc = subprocess.Popen([sys.executable, "-m", "referral_proxy", "move", "--config", str(config), "carol", "Work",
                             "b3"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        assert holder.held.wait(120), "the move never removed anything from b1"
        if command == "move":
            _client_moves(fleet, "Work", work[2])
        else:
            _client_expunges(fleet, "Work", work[2])
    finally:
        holder.release.set()
        out, _ = proc.communicate(timeout=300)
        holder.close()
    assert proc.returncode == 0, out.decode()[-3000:]
    where = _once(fleet, proxy, work if command == "move" else [i for i in work if i != work[2]])
    assert where[work[2]] == ([("b1", "INBOX")] if command == "move" else []), (where[work[2]], holder.line, out)


# -- a kill at each step of the drain's removal: recovery finishes it exactly once --------------------------------

DRAIN_STEPS = ["dropping:1", "dropped:1", "taking-back:1", "taking-back:2", "drained:1"]


@pytest.mark.parametrize("step", DRAIN_STEPS)
def test_a_drain_killed_at_each_step_with_a_clients_move_is_recovered_once(proxy_factory, fleet, tmp_path, step):
    inbox, work = ids("inbox", 2), ids("work", 8)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = subprocess.Popen([*faulty("--pause-at", "committed:1", "--pause-dir", str(pause), "--kill-at", step),
                             "move", "--config", str(proxy.config_path), "carol", "Work", "b3"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_paused(pause, "committed:1")
        _client_moves(fleet, "Work", work[5])
        _client_expunges(fleet, "Work", work[6])
    finally:
        (pause / "resume").touch()
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -9, out
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    where = _once(fleet, proxy, inbox + [i for i in work if i != work[6]])
    assert where[work[5]] == [("b1", "INBOX")], where[work[5]]
    assert {where[i][0] for i in work[:5] + work[7:]} == {("b3", "Work")}
    assert _no_entries(proxy)


def test_a_drain_killed_after_its_removal_ran_before_it_was_journaled(proxy_factory, fleet, tmp_path):
    """Killed at `dropping` (the UIDs to remove journaled), here with the removal done as the killed
    process would have sent it just before dying, and a client's MOVE of one of them first: recovery
    tells the drain's removals from the client's by content (what is in the private mailbox)."""
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    killed = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3",
                 command=faulty("--kill-at", "dropping:1"))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    store = journal_store(proxy)
    try:
        (entry,) = now(store.journal())
    finally:
        now(store.close())
    dropping = entry.data["dropping"]
    drop = dropping["drop"]
    assert drop.startswith(f"referral-proxy-aside-{entry.data['token']}/drop-")
    _client_moves(fleet, "Work", work[1])
    with fleet["b1"].client("carol") as m:  # the killed proxy's own UID MOVE, sent before it died
        assert m.create(f'"{drop}"')[0] == "OK"
        assert m.select(dropping["box"])[0] == "OK"
        assert m.uid("MOVE", dropping["uids"], f'"{drop}"')[0] == "OK"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    where = _once(fleet, proxy, work)
    assert where[work[1]] == [("b1", "INBOX")], where[work[1]]
    assert _no_entries(proxy)


@pytest.mark.parametrize("then", ["flagged", "moved on"])
def test_a_copy_a_client_changed_at_the_destination_is_never_taken_back(proxy_factory, fleet, tmp_path, then):
    """The source's message taken away by a client's command past the commit point, and its copy,
    after the placement switched, flagged (or moved on) at the destination by another client: the
    copy is left where it is (the move cannot tell which the user meant: both stay, never lost)."""
    work = ids("work", 4)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Later", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    proc, pause = _paused_move(proxy, tmp_path, "placed:1")
    try:
        _client_moves(fleet, "Work", work[1])
        with fleet["b3"].client("carol") as m:  # a client of the proxy, at the new place
            m.select("Work")
            if then == "flagged":
                assert m.uid("STORE", _uid_of(m, work[1]), "+FLAGS.SILENT", "(\\Flagged)")[0] == "OK"
            else:
                assert m.uid("MOVE", _uid_of(m, work[1]), "Later")[0] == "OK"
    finally:
        out = _resume(proc, pause)
    _counts, where = census(fleet, "carol")
    assert sorted(where[work[1]]) == [("b1", "INBOX"), ("b3", "Work" if then == "flagged" else "Later")], out
    assert all(where[i] == [("b3", "Work")] for i in work if i != work[1])
    assert _no_entries(proxy)


def test_an_older_versions_entry_past_its_expunges_is_finished_without_taking_anything_back(proxy_factory, fleet):
    """An entry written before drain.py (no `settled`: which UIDs its drain expunged is not known),
    recovered after an upgrade: the copies of the UIDs gone are the only ones left, never taken back."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    killed = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3",
                 command=faulty("--kill-at", "aside:1"))  # the source emptied in place, then set aside
    assert killed.returncode == -9, killed.stdout + killed.stderr
    store = journal_store(proxy)
    try:
        (entry,) = now(store.journal())
        del entry.data["settled"]
        now(store.journal_step(entry.id, entry.step, entry.data, entry.owner))
    finally:
        now(store.close())
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    where = _once(fleet, proxy, work)
    assert all(where[i] == [("b3", "Work")] for i in work), where
    assert _no_entries(proxy)

