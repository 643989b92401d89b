"""Found by the differential corpus (append-errors): when the backend refuses an APPEND
before its LITERAL+ literal (bad flags, bad date, a missing parenthesis), Dovecot
reads the literal's lines as commands. The proxy checks flags, date and syntax itself
and drops a refused command's literal unread: nothing of it reaches a backend."""

from __future__ import annotations

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("head", [b"(\\\\Bogus)", b'"99-Foo-2020 00:00:00 +0000"', b'(\\\\Seen "01-Jan-2020 00:00:00 +0000"'])
def test_literal_data_of_a_refused_append_never_runs_as_commands(proxy_factory, fleet, head):
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    w = Wire(proxy.host, proxy.port)
    w.login("carol", "secret")
    body = b"x1 CREATE Smuggled\r\nx2 CREATE Shared/Smuggled\r\n"
    w.send(b"a1 APPEND INBOX " + head.replace(b"\\\\", b"\\") + b" {%d+}\r\n" % len(body) + body + b"\r\n")
    assert w.until_tagged(b"a1")[-1].startswith(b"a1 BAD")
    assert w.cmd(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    w.close()
    for name in ("b1", "b3"):
        with fleet[name].client("carol") as m:
            listed = b" ".join(line for line in m.list()[1] if line)
        assert b"Smuggled" not in listed, (name, listed)  # the census: nothing made
