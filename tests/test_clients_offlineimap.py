"""``offlineimap3`` (Debian offlineimap3, OfflineIMAP 8.0.0 on imaplib2) syncing a
small account both ways through the proxy.

What OfflineIMAP does on the wire: ``CAPABILITY``, ``ID ("name" "OfflineIMAP" ...)``
before login, ``AUTHENTICATE PLAIN`` (continuation, no SASL-IR), ``LIST "" ""``
then ``LIST "" "*"``; a new local folder Shared/Made is ``CREATE Shared`` (the
parent too: the map's ``Shared/*`` does not cover ``Shared`` itself, so that one
lands on the home backend) then ``CREATE Shared/Made`` (b3); per folder
``SELECT`` and ``EXAMINE`` of the same mailbox, ``FETCH 1:* (FLAGS UID
INTERNALDATE)``, ``UID FETCH n (BODY.PEEK[])``; a new local message is ``APPEND
"box" (flags) "date" {n}`` with a SYNCHRONIZING literal (imaplib2 ignores
LITERAL+) followed by ``CHECK``; flag changes are one ``UID STORE n +FLAGS (f)``
per flag; a local deletion is ``UID STORE n +FLAGS (\\Deleted)`` + ``EXPUNGE``.
"""

from __future__ import annotations

from pathlib import Path

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
    seed,
    sha,
    stored,
    write_maildir,
)

_needs = needs("offlineimap", "offlineimap3")
pytestmark = pytest.mark.usefixtures("clean_mail")

FOLDERS = ("INBOX", "Shared/Off", "Shared/Made")


def _config(tmp_path: Path, host: str, port: int) -> Path:
    rc = tmp_path / f"offlineimaprc-{port}"
    rc.write_text(f"""\
[general]
accounts = test
metadata = {tmp_path}/meta
ui = basic
maxsyncaccounts = 1

[Account test]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {tmp_path}/mail
sep = /

[Repository remote]
type = IMAP
remotehost = {host}
remoteport = {port}
remoteuser = carol
remotepass = secret
ssl = no
starttls = no
maxconnections = 1
folderfilter = lambda name: name in {list(FOLDERS)!r}
""")
    return rc


def _offlineimap(rc: Path, tmp_path: Path):
    # -o: one run; -1: no threads (a deterministic order of commands)
    return run(["offlineimap", "-c", str(rc), "-o", "-1", "-u", "basic"],
               env={"HOME": str(tmp_path)}, timeout=90)


def _local(tmp_path: Path, folder: str):
    return read_maildir(tmp_path / "mail" / folder)


def _files(tmp_path: Path, folder: str) -> dict[str, Path]:
    """sha256 of the CRLF body -> file, in a local Maildir folder."""
    out = {}
    for sub in ("cur", "new"):
        for f in (tmp_path / "mail" / folder / sub).iterdir():
            data = f.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            out[sha(data)] = f
    return out


def _server(fleet, folder: str):
    return stored(fleet["b3" if folder.startswith("Shared/") else "b1"], "carol", folder)


def _same(local, server) -> bool:
    return sorted((sha(b), f) for b, f in local) == sorted((s.sha256, s.flags) for s in server)


def test_offlineimap_syncs_both_ways(proxy_factory, fleet, tmp_path):
    inbox = [message(i, 500 + 200 * i) for i in range(5)]
    off = [message(10 + i, 800) for i in range(3)]
    seed(fleet["b1"], "carol", "INBOX", [(inbox[0], "\\Seen"), (inbox[1], "\\Flagged"), inbox[2],
                                         (inbox[3], "\\Answered \\Seen"), inbox[4]])
    seed(fleet["b3"], "carol", "Shared/Off", [off[0], (off[1], "\\Seen"), off[2]])
    (tmp_path / "mail").mkdir()
    proxy = proxy_factory(rules=RULES)

    # 1. server -> local
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = _offlineimap(_config(tmp_path, relay.host, relay.port), tmp_path)
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode == 0, r
    assert b"ERROR" not in r.stdout + r.stderr, r
    for folder in ("INBOX", "Shared/Off"):
        assert _same(_local(tmp_path, folder), _server(fleet, folder)), folder
    assert b"AUTHENTICATE PLAIN" in b"\n".join(relay.commands())

    # 2. changes on both sides, then local -> server and server -> local at once
    new_local = [message(20 + i, 600) for i in range(2)]
    write_maildir(tmp_path / "mail", "Shared/Off", [(m, "") for m in new_local])
    write_maildir(tmp_path / "mail", "Shared/Made", [(message(30, 400), "S"), (message(31, 400), "F")])
    files = _files(tmp_path, "INBOX")
    f = files[sha(inbox[2])]  # inbox[2]: now \Seen \Flagged locally
    f.rename(f.parent.parent / "cur" / (f.name.split(":2,")[0] + ":2,FS"))
    files[sha(inbox[0])].unlink()  # deleted locally
    seed(fleet["b3"], "carol", "Shared/Off", [(message(40, 900), "\\Flagged")], create=False)

    r = _offlineimap(_config(tmp_path, proxy.host, proxy.port), tmp_path)
    assert r.returncode == 0, r
    assert b"ERROR" not in r.stdout + r.stderr, r

    server_inbox = _server(fleet, "INBOX")
    assert sorted(s.sha256 for s in server_inbox) == sorted(sha(m) for m in inbox[1:])
    assert {s.sha256: s.flags for s in server_inbox}[sha(inbox[2])] == {"\\Seen", "\\Flagged"}
    server_off = _server(fleet, "Shared/Off")
    assert sorted(s.sha256 for s in server_off) == sorted(sha(m) for m in off + new_local + [message(40, 900)])
    made = _server(fleet, "Shared/Made")  # a new local folder, created where the map says
    assert sorted((s.sha256, s.flags) for s in made) == sorted(
        [(sha(message(30, 400)), maildir_flags("S")), (sha(message(31, 400)), maildir_flags("F"))])
    assert "Shared/Made" not in mailboxes(fleet["b1"], "carol")
    for folder in FOLDERS:
        assert _same(_local(tmp_path, folder), _server(fleet, folder)), folder
