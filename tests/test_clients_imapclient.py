"""IMAPClient's ``multiappend()`` (RFC 3502) through the proxy.

IMAPClient sends the whole command with LITERAL+ (``{n+}``) when the server
announces it, so the 50 messages go in one burst; each message carries its own
flags and internal date.
"""

from __future__ import annotations

import datetime

import imapclient
import pytest
from clients import RULES, RecordingRelay, appenduids, mailboxes, message, sha, stored, uid_count

pytestmark = pytest.mark.usefixtures("clean_mail")

FLAGS = [(), (b"\\Seen",), (b"\\Flagged", b"\\Seen"), (b"\\Answered",), (b"$Label1",)]


def _messages(n: int = 50):
    base = datetime.datetime(2025, 3, 1, 8, 0, 0, tzinfo=datetime.UTC)
    return [{"msg": message(i, 200 + 97 * i), "flags": FLAGS[i % len(FLAGS)],
             "date": base + datetime.timedelta(minutes=17 * i)} for i in range(n)]


@pytest.mark.parametrize("mailbox, backend", [("Batch", "b1"), ("Shared/Batch", "b3")])
def test_imapclient_multiappend_of_50(proxy_factory, fleet, mailbox, backend):
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    msgs = _messages()
    try:
        c = imapclient.IMAPClient(relay.host, port=relay.port, ssl=False, timeout=30)
        c.login("alice", "secret")
        assert c.has_capability("MULTIAPPEND") and c.has_capability("LITERAL+")
        c.create_folder(mailbox)
        typ, data = c.multiappend(mailbox, msgs)
        c.logout()
        relay.wait_closed()
    finally:
        relay.stop()
    assert typ == "OK", data
    appends = [cmd for cmd in relay.commands() if b" APPEND " in cmd]
    assert len(appends) == 1, relay.commands()
    conn = relay.connections[0]
    # 50 non-synchronizing literals, and never a continuation request
    assert conn.client_to_server.count(b"+}\r\n") == 50
    assert not [line for line in conn.server_to_client.split(b"\r\n") if line.startswith(b"+")]
    assert [uid_count(s) for s in appenduids(conn.server_to_client)] == [50]

    got = stored(fleet[backend], "alice", mailbox)
    assert [s.sha256 for s in got] == [sha(m["msg"]) for m in msgs]
    assert [s.flags for s in got] == [frozenset(f.decode() for f in m["flags"]) for m in msgs]
    assert [s.when for s in got] == [int(m["date"].timestamp()) for m in msgs]
    others = {"b1", "b2", "b3"} - {backend}
    for name in others:
        assert mailbox not in mailboxes(fleet[name], "alice")


def test_imapclient_multiappend_to_a_missing_mailbox_appends_nothing(proxy_factory, fleet):
    proxy = proxy_factory(rules=RULES)
    c = proxy.imapclient()
    c.login("alice", "secret")
    typ, data = c.multiappend("Shared/Missing", _messages(5))
    c.logout()
    assert typ == "NO" and b"[TRYCREATE]" in data[0], data
    for name in ("b1", "b2", "b3"):
        assert "Shared/Missing" not in mailboxes(fleet[name], "alice")
