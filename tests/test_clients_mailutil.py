r"""UW ``mailutil`` (Debian uw-mailutils, c-client 2007f) through the proxy.

What mailutil does on the wire (recorded with RecordingRelay):

* ``AUTHENTICATE PLAIN`` (no SASL-IR), the password read from stdin once per
  connection when there is no terminal (the prompt goes to stderr);
* ``copy``/``move`` send ``Create <name>`` (mixed case), then ONE ``APPEND`` carrying
  every message (MULTIAPPEND, RFC 3502) with SYNCHRONIZING literals
  (``() " 5-Jan-2026 10:00:00 +0000" {n}``) although LITERAL+ is announced;
  ``append``/``appenddelete`` the same without the Create (a missing mailbox is
  ``NO [TRYCREATE]`` and mailutil gives up);
* it never uses IMAP COPY: a remote source is read on its own connection
  (``EXAMINE``/``SELECT``, ``FETCH n (BODY.PEEK[HEADER] BODY.PEEK[TEXT])``) while a
  second connection appends, so copies between two backends need no cross-server
  COPY in the proxy; ``appenddelete``/``move`` then ``STORE 1:n +Flags (\Deleted)``
  and ``EXPUNGE`` the source;
* each literal is written in two send()s (header, then body) with Nagle on: a
  server must ACK at once (TCP_QUICKACK) or every message waits ~40 ms;
* ``transfer`` asks ``LIST "<dst-prefix>" ""`` for the delimiter and lists the
  source with ``LIST "<src-prefix>" *`` (plain LIST, never RLIST, so the session
  stays transparent even though the proxy announces MAILBOX-REFERRALS).

Local mailboxes: c-client refuses them as root and, as Debian builds it, accepts
them only relative to $HOME; so mailutil runs as ``nobody`` with a private home.
"""

from __future__ import annotations

import time

import pytest
from clients import (
    RULES,
    Mbox,
    RecordingRelay,
    Unprivileged,
    appenduids,
    finish,
    mailboxes,
    message,
    needs,
    seed,
    sha,
    stored,
    uid_count,
)

_needs = needs("mailutil", "uw-mailutils")
pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.fixture
def nobody():
    u = Unprivileged()
    yield u
    u.cleanup()


def spec(host: str, port: int, mailbox: str, user: str = "alice") -> str:
    """A c-client remote mailbox name for the proxy (plain IMAP, no rsh, no TLS)."""
    return f"{{{host}:{port}/imap/norsh/notls/user={user}}}{mailbox}"


def mbox_of(n: int, start: int = 0) -> Mbox:
    mbox = Mbox()
    letters = ["", "R", "RA", "F", "RF", "T"]
    for i in range(start, start + n):
        # sizes from 300 bytes to ~20 KB (several TCP segments)
        size = 300 + (i * 7919) % 20000 if i % 10 == 0 else 300 + (i * 37) % 3000
        mbox.add(message(i, size), letters[i % len(letters)], when=1767607200 + 3600 * i)
    return mbox


def assert_same(got, expected, where: str) -> None:
    assert len(got) == len(expected), f"{where}: {len(got)} messages, expected {len(expected)}"
    assert [s.sha256 for s in got] == [sha(m.body) for m in expected], where
    assert [s.flags for s in got] == [m.flags for m in expected], where
    assert [s.when for s in got] == [m.when for m in expected], where


def test_mailutil_copies_an_mbox_of_200_into_a_local_and_a_remote_mailbox(proxy_factory, fleet, nobody):
    """``mailutil copy`` of one mbox into Archive (alice's home, b1) and into
    Shared/Archive (b3), both at once: each sends ONE APPEND of 200 messages
    (``-v`` prints the tagged OK: a single ``[APPENDUID v 1:200]``)."""
    proxy = proxy_factory(rules=RULES)
    mbox = mbox_of(200)
    t0 = time.monotonic()
    jobs = []
    for n, target in enumerate(("Archive", "Shared/Archive")):
        # one file each: c-client locks an mbox it reads, the second would wait
        mbox.write(nobody.home / f"in{n}.mbox")
        argv = ["mailutil", "copy", "-v", f"in{n}.mbox", spec(proxy.host, proxy.port, target)]
        jobs.append((nobody.start(argv, input=b"secret\n"), argv))
    results = [finish(p, argv, timeout=90, t0=t0) for p, argv in jobs]
    for r in results:
        assert r.returncode == 0, r
        assert [uid_count(s) for s in appenduids(r.output.encode())] == [200], r
    assert_same(stored(fleet["b1"], "alice", "Archive"), mbox.messages, "b1 Archive")
    assert_same(stored(fleet["b3"], "alice", "Shared/Archive"), mbox.messages, "b3 Shared/Archive")
    assert "Archive" not in mailboxes(fleet["b3"], "alice")
    assert "Shared/Archive" not in mailboxes(fleet["b1"], "alice")
    assert not mailboxes(fleet["b2"], "alice") - {"INBOX"}


def test_mailutil_copy_between_two_backends(proxy_factory, fleet, nobody):
    """``mailutil copy {proxy}INBOX {proxy}Shared/FromInbox``: b1 -> b3, flags kept.
    mailutil reads on one connection and appends on another: no COPY command."""
    msgs = [(message(i, 500 + 100 * i), flags)
            for i, flags in enumerate(["", "\\Seen", "\\Flagged \\Seen", "\\Answered", "$Label1 \\Seen"] * 4)]
    seed(fleet["b1"], "alice", "INBOX", msgs)
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = nobody.run(["mailutil", "copy", spec(relay.host, relay.port, "INBOX"),
                        spec(relay.host, relay.port, "Shared/FromInbox")], input=b"secret\nsecret\n")
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode == 0, r
    assert not [c for c in relay.commands() if b"COPY" in c.upper()], relay.commands()
    reader, writer = relay.connections
    assert [c.split(b" ")[1].upper() for c in writer.commands()] == [
        b"AUTHENTICATE", b"CREATE", b"APPEND", b"LOGOUT"], writer.commands()
    # one APPEND, 20 SYNCHRONIZING literals although the proxy announces LITERAL+
    assert writer.client_to_server.count(b"}\r\n") == 20 and b"+}" not in writer.client_to_server
    assert [uid_count(s) for s in appenduids(writer.server_to_client)] == [20]
    source = stored(fleet["b1"], "alice", "INBOX")
    copied = stored(fleet["b3"], "alice", "Shared/FromInbox")
    assert [s.sha256 for s in copied] == [s.sha256 for s in source] and len(copied) == 20
    # flags (keywords included) and internal dates are copied
    assert [s.flags for s in copied] == [s.flags for s in source]
    assert [s.when for s in copied] == [s.when for s in source]
    assert len(stored(fleet["b1"], "alice", "INBOX")) == 20  # the source is untouched
    assert "Shared/FromInbox" not in mailboxes(fleet["b1"], "alice")


def test_mailutil_appenddelete_moves_from_b3_to_an_existing_mailbox_on_b1(proxy_factory, fleet, nobody):
    seed(fleet["b3"], "alice", "Shared/Old", [message(i, 800) for i in range(10)])
    seed(fleet["b1"], "alice", "Kept", [message(100, 300)])
    proxy = proxy_factory(rules=RULES)
    before = stored(fleet["b3"], "alice", "Shared/Old")
    r = nobody.run(["mailutil", "appenddelete", spec(proxy.host, proxy.port, "Shared/Old"),
                    spec(proxy.host, proxy.port, "Kept")], input=b"secret\nsecret\n")
    assert r.returncode == 0, r
    kept = stored(fleet["b1"], "alice", "Kept")
    assert [s.sha256 for s in kept[1:]] == [s.sha256 for s in before]
    assert stored(fleet["b3"], "alice", "Shared/Old") == []  # flagged \Deleted and expunged


def test_mailutil_append_to_a_missing_remote_mailbox_creates_nothing(proxy_factory, fleet, nobody):
    """``append`` never creates: the proxy relays b3's NO [TRYCREATE] before any
    message is sent, and no backend gets the mailbox."""
    proxy = proxy_factory(rules=RULES)
    mbox_of(5).write(nobody.home / "in.mbox")
    r = nobody.run(["mailutil", "append", "in.mbox", spec(proxy.host, proxy.port, "Shared/Missing")],
                   input=b"secret\n")
    assert r.returncode != 0, r
    assert "[TRYCREATE]" in r.output, r
    for name in ("b1", "b2", "b3"):
        assert "Shared/Missing" not in mailboxes(fleet[name], "alice")


def test_mailutil_transfer_of_a_hierarchy_there_and_back(proxy_factory, fleet, nobody):
    """``transfer`` of a local folder of mboxes into Shared/Imported/ (b3), then of
    that remote hierarchy into Restored/ (b1), one MULTIAPPEND per mailbox."""
    (nobody.home / "mail").mkdir()
    boxes = {"mail/a": mbox_of(7, 0), "mail/b": mbox_of(4, 100)}
    for name, mbox in boxes.items():
        mbox.write(nobody.home / name)
    proxy = proxy_factory(rules=RULES)
    r = nobody.run(["mailutil", "transfer", "mail/", spec(proxy.host, proxy.port, "Shared/Imported/")],
                   input=b"secret\n")
    assert r.returncode == 0, r
    for name, mbox in boxes.items():
        assert_same(stored(fleet["b3"], "alice", f"Shared/Imported/{name}"), mbox.messages, name)
    assert not {n for n in mailboxes(fleet["b1"], "alice") if n.startswith("Shared")}

    r = nobody.run(["mailutil", "transfer", spec(proxy.host, proxy.port, "Shared/Imported/"),
                    spec(proxy.host, proxy.port, "Restored/")], input=b"secret\nsecret\n")
    assert r.returncode == 0, r
    for name, mbox in boxes.items():
        assert_same(stored(fleet["b1"], "alice", f"Restored/Shared/Imported/{name}"), mbox.messages, name)
    assert not {n for n in mailboxes(fleet["b3"], "alice") if n.startswith("Restored")}


def test_mailutil_synchronizing_literals(proxy_factory, fleet, nobody):
    """c-client writes each literal, then its CRLF, in two send()s with Nagle on.
    Without TCP_QUICKACK on the proxy's sockets each message waited ~40 ms for a
    delayed ACK; how long it takes is measured by bench/bench_append.py mode (d)
    against direct Dovecot (timings do not belong in tests). Here: all arrive."""
    proxy = proxy_factory(rules=RULES)
    mbox = mbox_of(50)
    mbox.write(nobody.home / "in.mbox")
    r = nobody.run(["mailutil", "copy", "in.mbox", spec(proxy.host, proxy.port, "Timed")], input=b"secret\n")
    assert r.returncode == 0, r
    assert_same(stored(fleet["b1"], "alice", "Timed"), mbox.messages, "Timed")
