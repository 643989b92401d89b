r"""``imapfilter`` (Debian imapfilter 2.8) running Lua configs through the proxy.

What imapfilter does on the wire: ``CAPABILITY``, ``LOGIN "alice" "secret"``,
``CAPABILITY`` again, ``NAMESPACE``; ``append_message`` is ``APPEND "box" (flags)
"date" {n}`` with a SYNCHRONIZING literal (it waits for ``+``) even though the
proxy announces LITERAL+; ``copy_messages`` within one account is ``UID COPY``;
``move_messages`` is ``UID COPY`` + ``UID STORE n +FLAGS.SILENT (\Deleted)`` +
``EXPUNGE`` — never MOVE, although MOVE is announced; every search is ``UID
SEARCH ALL ...``.  Its LOGIN quoting escapes ``"`` but not ``\`` (``"p@ss \"w0rd\"
\x"``): Dovecot reads ``\x`` as ``x``, the proxy rejects the string (BAD), so a
password with a backslash cannot log in through the proxy (nor, correctly, at Dovecot).
"""

from __future__ import annotations

import pytest
from clients import (
    RULES,
    RecordingRelay,
    mailboxes,
    message,
    needs,
    run,
    seed,
    sha,
    stored,
)

_needs = needs("imapfilter", "imapfilter")
pytestmark = pytest.mark.usefixtures("clean_mail")

PRELUDE = """\
options.timeout = 30
options.info = true
options.create = false
options.expunge = true
acct = IMAP {{ server = '{host}', port = {port}, username = '{user}', password = {password} }}
"""


def _lua(s: bytes) -> str:
    """A Lua string literal for *s* (bytes kept as \\ddd escapes)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in s) + '"'


def _imapfilter(tmp_path, host, port, body: str, user: str = "alice", password: bytes = b"secret"):
    config = tmp_path / "config.lua"
    config.write_text(PRELUDE.format(host=host, port=port, user=user, password=_lua(password)) + body)
    return run(["imapfilter", "-c", str(config)], env={"HOME": str(tmp_path)}, timeout=60)


def test_imapfilter_append_uid_copy_and_moves_on_one_backend(proxy_factory, fleet, tmp_path):
    """Appends with synchronizing literals to INBOX (b1), UID COPY of all of them to
    Archive (b1), and two COPY + \\Deleted + EXPUNGE moves: INBOX -> Archive on b1,
    Shared/In -> Shared/Done on b3 (alice's home is b1: the move is relayed to b3)."""
    seed(fleet["b1"], "alice", "Archive", [])
    seed(fleet["b3"], "alice", "Shared/In", [message(100 + i, 900) for i in range(6)])
    seed(fleet["b3"], "alice", "Shared/Done", [])
    msgs = [message(i, 300 + 250 * i) for i in range(5)]
    appends = "\n".join(
        f"assert(acct.INBOX:append_message({_lua(m)}, {{'\\\\Flagged'}}, '0{i + 1}-Feb-2025 09:00:00 +0000'))"
        if i % 2 else f"assert(acct.INBOX:append_message({_lua(m)}))"
        for i, m in enumerate(msgs))
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = _imapfilter(tmp_path, relay.host, relay.port, appends + """
assert(acct.INBOX:select_all():copy_messages(acct.Archive))
assert(acct.INBOX:contain_subject('message 3'):move_messages(acct.Archive))
local done = acct['Shared/In']:contain_subject('message 102')
assert(done:move_messages(acct['Shared/Done']))
""")
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode == 0, r
    sent = relay.commands()
    verbs = [c.split(b" ", 1)[1] for c in sent]
    assert sum(v.startswith(b"APPEND ") for v in verbs) == 5
    assert all(v.endswith(b"}") and not v.endswith(b"+}") for v in verbs if v.startswith(b"APPEND "))
    assert sum(v.startswith(b"UID COPY ") for v in verbs) == 3
    assert not any(v.startswith((b"MOVE", b"UID MOVE")) for v in verbs), verbs
    assert sum(v.startswith(b"UID STORE ") and b"\\Deleted" in v for v in verbs) == 2
    assert sum(v == b"EXPUNGE" for v in verbs) >= 2

    inbox = stored(fleet["b1"], "alice", "INBOX")
    archive = stored(fleet["b1"], "alice", "Archive")
    # message 3 was moved: 4 left in INBOX; Archive has 5 copies + the moved one
    assert [s.sha256 for s in inbox] == [sha(m) for i, m in enumerate(msgs) if i != 3]
    assert [s.sha256 for s in archive] == [sha(m) for m in msgs] + [sha(msgs[3])]
    assert [s.flags for s in archive] == [frozenset({"\\Flagged"}) if i % 2 else frozenset()
                                          for i in (0, 1, 2, 3, 4, 3)]
    assert inbox[1].when == archive[1].when  # "02-Feb-2025 09:00:00 +0000", copied
    shared_in = stored(fleet["b3"], "alice", "Shared/In")
    shared_done = stored(fleet["b3"], "alice", "Shared/Done")
    assert [s.sha256 for s in shared_done] == [sha(message(102, 900))]
    assert len(shared_in) == 5 and sha(message(102, 900)) not in {s.sha256 for s in shared_in}
    assert not {"Shared/In", "Shared/Done"} & mailboxes(fleet["b1"], "alice")
    assert not {"Archive"} & mailboxes(fleet["b3"], "alice")


def test_imapfilter_move_between_backends(proxy_factory, fleet, tmp_path):
    """``move_messages`` from INBOX (b1) to Shared/Archive (b3): the proxy carries
    out imapfilter's UID COPY across servers (COPYUID), then imapfilter's \\Deleted
    + EXPUNGE empties the source."""
    msgs = [message(i, 700 + 300 * i) for i in range(4)]
    seed(fleet["b1"], "alice", "INBOX", [(m, "\\Seen") for m in msgs[:2]] + [(m, "\\Flagged") for m in msgs[2:]])
    seed(fleet["b3"], "alice", "Shared/Archive", [message(50, 400)])
    before = stored(fleet["b1"], "alice", "INBOX")
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = _imapfilter(tmp_path, relay.host, relay.port, """
assert(acct.INBOX:select_all():move_messages(acct['Shared/Archive']))
""")
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode == 0, r
    verbs = [c.split(b" ", 1)[1] for c in relay.commands()]
    assert b'UID COPY 1:4 "Shared/Archive"' in verbs, verbs
    assert b"[COPYUID " in relay.connections[0].server_to_client
    moved = stored(fleet["b3"], "alice", "Shared/Archive")[1:]
    assert [(s.sha256, s.flags, s.when) for s in moved] == [(s.sha256, s.flags, s.when) for s in before]
    assert stored(fleet["b1"], "alice", "INBOX") == []
    assert "Shared/Archive" not in mailboxes(fleet["b1"], "alice")


def test_imapfilter_cannot_send_a_password_with_a_backslash(proxy_factory, fleet, tmp_path):
    r"""imapfilter escapes ``"`` but not ``\`` in LOGIN: dave's ``p@ss "w0rd" \x`` goes
    as ``"p@ss \"w0rd\" \x"``, an invalid quoted string. The proxy answers BAD (and
    stays up); imapfilter gives up without doing anything."""
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = _imapfilter(tmp_path, relay.host, relay.port, "acct:create_mailbox('Never')\n",
                        user="dave", password=b'p@ss "w0rd" \\x')
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode != 0, r
    assert [c.split(b" ", 1)[1] for c in relay.commands() if b" LOGIN " in c] == [
        b'LOGIN "dave" "p@ss \\"w0rd\\" \\x"'], relay.commands()
    assert b" BAD " in relay.connections[0].server_to_client
    assert proxy.running
    assert "Never" not in mailboxes(fleet["b1"], "dave")
    m = proxy.login("dave")  # imaplib quotes it right
    m.logout()
