"""SIGHUP while the map names a backend: the new file drops it (a RENAME across to it running, or a
placement on it), or does not parse. Judged by a census of every backend and by what a client
reaches through the proxy afterwards.

Seen on main: a reload removing b3 while RENAME Work Shared/Work (to b3) ran was applied, the move
finished onto b3 (``OK``), and Shared/Work answered ``NO [UNAVAILABLE]`` from then on: its 20
messages on b3, placed there, out of the proxy's reach.
"""

from __future__ import annotations

import re
import signal

import pytest
from imapwire import Wire
from movecheck import census, faulty, judge, seed, wait_paused
from test_ops_dovecot import wait_for

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
MASTERS = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}


def _without(text: str, backend: str) -> str:
    text = re.sub(r"\[backends\.%s\][^\[]*" % backend, "", text)
    return re.sub(r"\[\[map\.rules\]\][^\[]*\"%s\"[^\[]*" % backend, "", text)


def _reload(proxy, text: str, n: int) -> str:
    """Write *text*, SIGHUP, wait for the *n*-th reload line (applied or refused): the log since."""
    before = proxy.stderr_text()
    proxy.config_path.write_text(text)
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.stderr_text().count("reload") >= n, "the reload's line")
    return proxy.stderr_text()[len(before):]


def _status(proxy, user: str, name: bytes) -> bytes:
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login(user)
    reply = w.cmd(b"s", b"STATUS " + name + b" (MESSAGES)")
    w.close()
    return reply[0]


def _reloaded_mid_rename(proxy_factory, fleet, tmp_path, change) -> tuple:
    """RENAME Work Shared/Work (20 messages, b1 -> b3) paused after its first copy, the file changed by
    *change* (its text -> the new one) and SIGHUP sent, then resumed and answered OK: (proxy, text, work)."""
    work = [f"work-{i}@t" for i in range(20)]
    seed(fleet["b1"], "carol", "Work", work)
    pause = tmp_path / "pause"
    pause.mkdir()
    a = proxy_factory({"backends": MASTERS}, rules=RULES,
                      command=faulty("--pause-at", "copied:1", "--pause-dir", str(pause)))
    w = Wire(a.host, a.port, timeout=120)
    w.login("carol")
    w.send(b"r RENAME Work Shared/Work\r\n")
    assert wait_paused(pause, "copied:1") == "copied:1"
    text = a.config_path.read_text()
    a.config_path.write_text(change(text))
    a.send_signal(signal.SIGHUP)  # taken when the process runs again, the move's entry still open
    (pause / "resume").touch()
    assert w.until_tagged(b"r")[-1].startswith(b"r OK")
    w.close()
    wait_for(lambda: "reload" in a.stderr_text(), "the reload's line")
    return a, text, work


def test_a_reload_dropping_the_destination_of_a_running_rename_is_refused(proxy_factory, fleet, tmp_path):
    a, text, work = _reloaded_mid_rename(proxy_factory, fleet, tmp_path, lambda text: _without(text, "b3"))
    log = a.stderr_text()
    assert "reload refused" in log and "b3" in log, log[-2000:]
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work} == {("b3", "Shared/Work")}
    assert _status(a, "carol", b"Shared/Work") == b"* STATUS Shared/Work (MESSAGES 20)\r\n"  # reached
    # the placement on b3 keeps refusing it; a file that does not parse is refused too
    assert "reload refused" in _reload(a, _without(text, "b3"), 2)
    assert "reload refused" in _reload(a, text + "\n[map\n", 3)
    assert _status(a, "carol", b"Shared/Work") == b"* STATUS Shared/Work (MESSAGES 20)\r\n"


def test_a_reload_repointing_the_destination_of_a_running_rename_is_refused_until_it_ends(proxy_factory, fleet,
                                                                                           tmp_path):
    """b3's endpoint pointed at b2's Dovecot mid-move: a recovery would have rolled back (or finished) on
    the wrong server (hostile probe 4: copies left twice on the real b3, another mailbox's UIDs expunged).
    Refused while the entry is open; applied once it has ended (a placement survives a new address)."""
    repointed = ""

    def repoint(text: str) -> str:
        nonlocal repointed
        repointed = text.replace(fleet["b3"].endpoint, fleet["b2"].endpoint)
        assert repointed != text
        return repointed

    a, text, work = _reloaded_mid_rename(proxy_factory, fleet, tmp_path, repoint)
    log = a.stderr_text()
    assert "reload refused" in log and "b3 with a new endpoint" in log, log[-2000:]
    assert _status(a, "carol", b"Shared/Work") == b"* STATUS Shared/Work (MESSAGES 20)\r\n"  # still the real b3
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work} == {("b3", "Shared/Work")}
    assert "reloaded" in _reload(a, repointed, 2)  # nothing in progress names b3 now
    assert _status(a, "carol", b"Shared/Work").startswith(b"s NO")  # b2's Dovecot has no Shared/Work


def test_a_reload_dropping_a_backend_nothing_names_is_applied(proxy_factory, fleet):
    seed(fleet["b2"], "carol", "Far", ["far-0@t"])
    a = proxy_factory({"backends": MASTERS}, rules=[*RULES, {"mailbox": "Far", "backend": "b2"}])
    assert _status(a, "carol", b"Far") == b"* STATUS Far (MESSAGES 1)\r\n"
    assert "reloaded" in _reload(a, _without(a.config_path.read_text(), "b2"), 1)
    assert _status(a, "carol", b"Far").startswith(b"s NO")  # routed to b1 now, where there is no Far


def test_a_reload_says_which_changes_need_a_restart(proxy_factory, fleet):
    """[log], [metrics] and [map] store are read once: a reload changing them said "reloaded" and went on
    with the old ones, silently (hostile probe 4). Each is named, and kept as it runs."""
    a = proxy_factory({"backends": MASTERS}, rules=RULES)
    text = a.config_path.read_text()
    assert "[log]" not in text and "[metrics]" not in text
    changed = text + '\n[log]\nformat = "json"\nlevel = "warn"\n'

    def reload(text: str) -> str:
        before = a.stderr_text()
        n = before.count("reloaded backends")
        a.config_path.write_text(text)
        a.send_signal(signal.SIGHUP)
        wait_for(lambda: a.stderr_text().count("reloaded backends") > n, "the reload's line")
        return a.stderr_text()[len(before):]

    log = reload(changed)
    assert "[log] changes need a restart" in log and "reloaded" in log, log
    log = reload(changed + "\n")  # still the running [log]: said again
    assert "[log] changes need a restart" in log, log
    log = reload(text.replace("map.sqlite3", "other.sqlite3"))
    assert "[map] store changes need a restart" in log, log
    assert _status(a, "carol", b"INBOX").startswith(b"* STATUS INBOX")
    # Placements and journal entries are keyed by the names these make (probe r2, stop 50: applied silently,
    # LOGIN Alice became another user, without Alice's placements)
    log = reload(text.replace("[map]\n", '[map]\nusername_format = "as-is"\nseparator = "."\n', 1))
    assert "[map] username_format changes need a restart" in log and "[map] separator changes need a restart" in log, log
    assert _status(a, "Carol", b"INBOX").startswith(b"* STATUS INBOX")


def test_a_worker_started_again_after_a_refused_reload_runs_what_its_master_runs(proxy_factory, fleet):
    """Probe r2 (stop 50): a reload refused (b3 still named by a placement) left the file on disk; a worker
    killed and started again read it and ran without b3: its sessions got NO [UNAVAILABLE] for Shared/Work
    (9 of 20 logins), its master and the other worker with b3. It runs its master's configuration now."""
    import os
    import time

    work = [f"w-{i}@t" for i in range(5)]
    seed(fleet["b1"], "carol", "Work", work)
    a = proxy_factory({"backends": MASTERS, "proxy": {"workers": 2}}, rules=RULES)
    w = Wire(a.host, a.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"r", b"RENAME Work Shared/Work")[-1].startswith(b"r OK")  # placed on b3
    w.close()
    assert "reload refused" in _reload(a, _without(a.config_path.read_text(), "b3"), 1)
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", a.stderr_text())]
    assert len(pids) == 2, a.stderr_text()[-2000:]
    os.kill(pids[0], signal.SIGKILL)  # as the OOM killer would
    wait_for(lambda: len(re.findall(r"worker \d started", a.stderr_text())) == 3, "the worker started again")
    time.sleep(1)  # (it listens once started)
    answers = {_status(a, "carol", b"Shared/Work") for _ in range(12)}
    assert answers == {b"* STATUS Shared/Work (MESSAGES 5)\r\n"}, answers


def test_a_worker_started_again_after_a_reload_keeps_what_is_read_at_start_up_only(proxy_factory, fleet):
    """Probe c3 (stop 55): a reload naming another [map] store and another listen was warned "still ..." yet
    kept as the running text; workers killed and started again opened the other store (Shared/Work's
    placement not in it: NO, 8 of 8 logins, its 5 messages out of reach) or, listen changed, refused to
    start (a client connected and got no greeting). A second reload back warned of a change that was none."""
    import os
    import time

    seed(fleet["b1"], "carol", "Work", [f"w-{i}@t" for i in range(5)])
    a = proxy_factory({"backends": MASTERS, "proxy": {"workers": 2}}, rules=RULES)
    w = Wire(a.host, a.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"r", b"RENAME Work Shared/Work")[-1].startswith(b"r OK")  # placed on b3
    w.close()
    text = a.config_path.read_text()
    listen = re.search(r'"tcp:(\d+):interface=127\.0\.0\.1"', text)
    assert listen is not None and "map.sqlite3" in text and "workers = 2" in text, text
    other = f'"tcp:{int(listen.group(1)) + 1}:interface=127.0.0.1"'
    changed = (text.replace("map.sqlite3", "other.sqlite3").replace("workers = 2", "workers = 3")
               .replace(listen.group(0), f"{listen.group(0)}, {other}"))
    log = _reload(a, changed, 1)
    assert "[map] store changes need a restart" in log and "listen changes need a restart" in log, log
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", a.stderr_text())]
    assert len(pids) == 2, a.stderr_text()[-2000:]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    wait_for(lambda: len(re.findall(r"worker \d started", a.stderr_text())) >= 4, "the workers started again")
    time.sleep(1)  # (they listen once started)
    answers = {_status(a, "carol", b"Shared/Work") for _ in range(8)}
    assert answers == {b"* STATUS Shared/Work (MESSAGES 5)\r\n"}, answers
    assert "listen changed since the master started" not in a.stderr_text()
    assert not (a.config_path.parent / "other.sqlite3").exists()
    log = _reload(a, text, 2)  # the file as it started: nothing to warn of
    assert "need a restart" not in log, log


def test_a_reload_whose_map_check_ends_after_a_later_reload_does_not_undo_it(monkeypatch):
    """Probe c3 (stop 55): a reload dropping a backend is applied once the map (PostgreSQL: asynchronously) says
    nothing names it; a second SIGHUP applied meanwhile was then undone by the first, older file."""
    from types import SimpleNamespace

    from twisted.internet import defer

    from referral_proxy import service

    checked: defer.Deferred[list[str]] = defer.Deferred()

    async def still_named(mailbox_map, removed, repointed):
        return await checked

    monkeypatch.setattr(service, "still_named", still_named)
    proxy = service.ProxyService.__new__(service.ProxyService)
    applied: list[str] = []
    proxy._reloads, proxy.context = 1, SimpleNamespace(mailbox_map=None)
    proxy._apply = lambda path, config: applied.append(path)
    done = defer.ensureDeferred(proxy._reload_unless_named("first", None, {"b4"}, set()))
    proxy._reloads += 1  # the second SIGHUP, applied at once
    checked.callback([])
    assert done.called and applied == []
    checked2: defer.Deferred[list[str]] = defer.Deferred()
    checked = checked2
    done = defer.ensureDeferred(proxy._reload_unless_named("alone", None, {"b4"}, set()))
    checked2.callback([])
    assert done.called and applied == ["alone"]
