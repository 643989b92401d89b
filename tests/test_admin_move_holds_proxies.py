"""The admin ``referral-proxy move`` RENAMEs each source aside on its backend: the proxies on the same
SQLite map file hold their sessions of its user there meanwhile, as for a RENAME of their own
(peerholds.py; renamehold.py says why: a STATUS at that moment would leave its uidlist lock in the
aside, naming a live process). Seen by a proxy that cannot answer (stopped): the move waits for it
ASK_WAIT at most, says so, and finishes."""

from __future__ import annotations

import os
import signal

import pytest
from imapwire import Wire
from movecheck import cli

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER
from referral_proxy.workerholds import ASK_WAIT

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"user": "alice", "mailbox": "*", "backend": "b1"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
MESSAGE = b"From: a@example.org\r\nMessage-ID: <aside.1@t>\r\nSubject: aside\r\n\r\nbody\r\n"


def test_the_admin_moves_rename_aside_asks_the_proxies_on_the_map_file(proxy_factory, fleet):
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=30)
    w.login("alice")
    assert w.cmd(b"c", b"CREATE Work")[-1].startswith(b"c OK")
    assert w.cmd(b"a", b"APPEND Work {%d+}\r\n" % len(MESSAGE) + MESSAGE)[-1].startswith(b"a OK")
    assert w.cmd(b"s", b"STATUS Work (MESSAGES)")[-1].startswith(b"s OK")  # alice's session on b1
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        moved = cli("move", "--config", str(proxy.config_path), "alice", "Work", "b2", timeout=ASK_WAIT + 90)
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "did not all hold within" in moved.stdout + moved.stderr, (moved.stdout + moved.stderr)[-3000:]
    direct = Wire(fleet["b2"].host, fleet["b2"].port, timeout=30)
    direct.login("alice", fleet["b2"].password("alice"))
    fetched = b"".join(direct.cmd(b"f", b"EXAMINE Work") + direct.cmd(b"g", b"FETCH 1:* BODY.PEEK[]"))
    assert fetched.count(b"<aside.1@t>") == 1, fetched
    gone = Wire(fleet["b1"].host, fleet["b1"].port, timeout=30)
    gone.login("alice", fleet["b1"].password("alice"))
    assert b"Work" not in b"".join(gone.cmd(b"l", b'LIST "" "*"'))
