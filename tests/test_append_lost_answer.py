"""An APPEND whose backend connection is lost after the whole command was sent, before the
backend's answer came: the backend may have saved the messages (here it did: Dovecot committed
and its OK was cut off by a relay), so the client must not be told that nothing was appended
(it would append them again). Real Dovecot behind a relay; judged by the backend's mailbox."""

from __future__ import annotations

import re
import socket

import pytest
from cyradm import RecordingRelay
from imapwire import Wire
from mailcheck import contents

pytestmark = pytest.mark.usefixtures("clean_mail")

MESSAGES = [b"Subject: lost answer %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]


def _cut_after_the_commit(relay: RecordingRelay):
    """The relay's rewrite: Dovecot's tagged OK of an APPEND is never passed on; every backend
    connection through the relay is cut instead."""
    def rewrite(line: bytes, command: bytes | None) -> bytes | None:
        if command is not None and b" APPEND " in command.upper() and re.match(rb"\S+ OK", line):
            for conn in list(relay.connections):
                for s in (conn.client, conn.server):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            return b""
        return None
    return rewrite


@pytest.mark.parametrize("count", [1, 3])
def test_a_lost_answer_after_the_whole_append_is_not_said_to_have_appended_nothing(proxy_factory, fleet, count):
    b3 = fleet["b3"]
    with b3.client("alice") as m:
        m.create("Shared/Box")
    relay = RecordingRelay(b3.host, b3.port)
    relay.rewrite = _cut_after_the_commit(relay)
    try:
        proxy = proxy_factory({"backends": {"b3": {"endpoint": f"tcp:host={relay.host}:port={relay.port}"}}},
                              rules=[{"mailbox": "Shared/*", "backend": "b3"}])
        w = Wire(proxy.host, proxy.port)
        w.login()
        w.send(b"a APPEND Shared/Box" + b"".join(b" {%d+}\r\n" % len(m) + m for m in MESSAGES[:count]) + b"\r\n")
        answer = w.until_tagged(b"a")[-1]
        assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")  # the session goes on (b3 is not its home)
        w.close()
    finally:
        relay.stop()
    saved = contents(b3, "alice", "Shared/Box")
    assert len(saved) == count  # Dovecot committed them: once each
    # main: "a NO [UNAVAILABLE] Mail server connection lost; nothing was appended"
    assert answer == (b"a NO [UNAVAILABLE] Mail server connection lost after the whole command was sent; "
                      b"the messages may or may not be there\r\n"), answer
