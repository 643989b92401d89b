"""``mbsync`` (Debian isync 1.4) pushing and pulling a Maildir through the proxy.

What mbsync does on the wire: ``LOGIN "alice" "secret"`` (AuthMechs LOGIN),
``NAMESPACE``, ``LIST "" "*"`` (the proxy's merged listing of every backend),
``CREATE`` + ``SELECT`` of each far-side mailbox, then every new message as its
own ``APPEND "box" (\\Seen) {n+}`` — all of them pipelined with LITERAL+, without
waiting for a single answer.  It adds an ``X-TUID:`` header to each message it
uploads (to find it again without UIDPLUS) and writes Maildir files with LF line
ends, so contents are compared without X-TUID and line-end differences.
"""

from __future__ import annotations

import pytest
from clients import (
    RULES,
    RecordingRelay,
    mailboxes,
    maildir_flags,
    message,
    needs,
    read_maildir,
    run,
    sha,
    stored,
    without_header,
    write_maildir,
)

_needs = needs("mbsync", "isync")
pytestmark = pytest.mark.usefixtures("clean_mail")

FOLDERS = {"Shared/Sync": 400, "Work": 100}  # 500 messages: b3 and alice's home b1
LETTERS = ["", "S", "FS", "RS", "D", "F"]


def _config(tmp_path, host, port) -> str:
    return f"""\
IMAPAccount proxy
Host {host}
Port {port}
User alice
Pass secret
SSLType None
AuthMechs LOGIN
Timeout 60

IMAPStore remote
Account proxy

MaildirStore upload
Path {tmp_path}/upload/
Inbox {tmp_path}/upload/INBOX
SubFolders Verbatim

MaildirStore download
Path {tmp_path}/download/
Inbox {tmp_path}/download/INBOX
SubFolders Verbatim

Channel push
Far :remote:
Near :upload:
Patterns {" ".join(FOLDERS)}
Create Far
Sync Push
SyncState {tmp_path}/state-push/

Channel pull
Far :remote:
Near :download:
Patterns *
Create Near
Sync Pull
SyncState {tmp_path}/state-pull/
"""


def _norm(body: bytes) -> str:
    return sha(without_header(body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), b"X-TUID"))


def test_mbsync_pushes_500_messages_and_pulls_them_back(proxy_factory, fleet, tmp_path):
    originals = {}
    n = 0
    for folder, count in FOLDERS.items():
        msgs = [(message(n + i, 300 + (n + i) * 53 % 6000), LETTERS[(n + i) % len(LETTERS)])
                for i in range(count)]
        n += count
        originals[folder] = msgs
        write_maildir(tmp_path / "upload", folder, msgs)
    for d in ("download", "state-push", "state-pull"):
        (tmp_path / d).mkdir()
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        rc = tmp_path / "mbsyncrc"
        rc.write_text(_config(tmp_path, relay.host, relay.port))
        push = run(["mbsync", "-c", str(rc), "push"], env={"HOME": str(tmp_path)}, timeout=120)
        assert push.returncode == 0, push
        assert relay.wait_closed()
    finally:
        relay.stop()

    # pipelined: the 500 APPENDs with {n+} literals, and no continuation request
    conn, = relay.connections
    appends = [c for c in conn.commands() if b" APPEND " in c]
    assert len(appends) == 500 and all(c.endswith(b"+}") for c in appends), appends[:3]
    assert not [line for line in conn.server_to_client.split(b"\r\n") if line.startswith(b"+")]

    for folder, msgs in originals.items():
        backend = fleet["b3" if folder.startswith("Shared/") else "b1"]
        got = stored(backend, "alice", folder)
        assert len(got) == len(msgs), folder
        # as sent: CRLF, plus mbsync's X-TUID header; content otherwise identical
        assert sorted(_norm(s.body) for s in got) == sorted(sha(b) for b, _ in msgs), folder
        assert all(b"X-TUID: " in s.body for s in got)
        by_content = {_norm(s.body): s.flags for s in got}
        assert {sha(b): maildir_flags(f) for b, f in msgs} == by_content, folder
    assert "Work" not in mailboxes(fleet["b3"], "alice")
    assert "Shared/Sync" not in mailboxes(fleet["b1"], "alice")

    rc = tmp_path / "mbsyncrc-direct"  # no relay this time
    rc.write_text(_config(tmp_path, proxy.host, proxy.port))
    pull = run(["mbsync", "-c", str(rc), "pull"], env={"HOME": str(tmp_path)}, timeout=120)
    assert pull.returncode == 0, pull
    for folder, msgs in originals.items():
        backend = fleet["b3" if folder.startswith("Shared/") else "b1"]
        server = {_norm(s.body): s.flags for s in stored(backend, "alice", folder)}
        local = read_maildir(tmp_path / "download" / folder)
        assert len(local) == len(msgs), folder
        assert {_norm(body): flags for body, flags in local} == server, folder
