"""A reload that gives a backend another endpoint ends the sessions connected to the old one.

Probe h3 (stop 58): b2's endpoint pointed at another server and SIGHUP sent; sessions that had a
connection to b2 (one with a mailbox there selected, one that had only asked its STATUS, one IDLE)
went on using it: their APPENDs were answered OK and saved on the OLD server, invisible through the
proxy from then on; only new sessions reached the new one. Now such a session is told ``* BYE`` (between
commands, as after a move) and logs in again, to the new server; the others go on. Judged by a census.
"""

from __future__ import annotations

import signal

import pytest
from imapwire import Wire, wait_for
from mailcheck import contents

pytestmark = pytest.mark.usefixtures("clean_mail")

MSG = b"Subject: after\r\nMessage-Id: <after-reload@t>\r\n\r\nafter the reload\r\n"


def test_sessions_on_a_repointed_backend_are_told_bye_and_new_mail_reaches_the_new_server(
        proxy_factory, fleet, spare_backend):
    for backend in (fleet["b3"], spare_backend):
        backend.reset_mail("alice")
        with backend.client("alice") as m:
            m.create("Shared/X")
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    selected, asked, elsewhere = (Wire(proxy.host, proxy.port, timeout=15) for _ in range(3))
    for w in (selected, asked, elsewhere):
        w.login()
    assert selected.cmd(b"s", b"SELECT Shared/X")[-1].startswith(b"s OK")
    assert asked.cmd(b"t", b"STATUS Shared/X (MESSAGES)")[-1].startswith(b"t OK")
    assert elsewhere.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    text = proxy.config_path.read_text()
    assert fleet["b3"].endpoint in text
    proxy.config_path.write_text(text.replace(fleet["b3"].endpoint, spare_backend.endpoint)
                                 .replace(fleet["b3"].url, spare_backend.url))
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded backends and map rules" in proxy.stderr_text(), "the reload", timeout=15)
    # at once (probe i1: in the second before the watch's next look, this APPEND was saved on the OLD server)
    asked.send(b"a APPEND Shared/X {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
    for w in (selected, asked):  # their connections reach the old server: told to log in again
        assert w.line().startswith(b"* BYE "), "no BYE"
        assert w.closed(timeout=10)
    elsewhere.send(b"a APPEND Shared/X {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
    assert elsewhere.until_tagged(b"a")[-1].startswith(b"a OK")
    elsewhere.close()
    assert len(contents(spare_backend, "alice", "Shared/X")) == 1
    assert contents(fleet["b3"], "alice", "Shared/X") == []
