"""Commands pipelined after a MULTIAPPEND on a backend without it (staging.py), in the same
write: they run after the whole MULTIAPPEND, as on one server, and never see the staging's
hold on the target (main refused a pipelined RENAME of the target NO [INUSE], "another
command", the hold of the client's own APPEND that had just been answered). Real Dovecot;
judged by the backend's mailboxes."""

from __future__ import annotations

import pytest
from conftest import dovecot_root
from imapwire import Wire
from mailcheck import contents

from referral_proxy.fleet import Dovecot

MESSAGES = [b"Subject: piped %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]


@pytest.fixture(scope="module")
def no_multiappend():
    d = Dovecot("piped-nomulti", "127.0.0.13", dovecot_root() / "piped-nomulti", extra_config=(
        "protocol imap {\n  imap_capability = IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT "
        "NAMESPACE CHILDREN MOVE\n}\n"))
    d.start()
    yield d
    d.stop()


def _session(proxy_factory, backend: Dovecot) -> Wire:
    backend.reset_mail("alice")
    with backend.client("alice") as m:
        m.create("Box")
    proxy = proxy_factory({"backends": {"x": {"endpoint": backend.endpoint, "url": backend.url}},
                           "map": {"default": "x"}})
    w = Wire(proxy.host, proxy.port)
    w.login()
    return w


def _multiappend(last: bytes = b"") -> bytes:
    return b"a APPEND Box" + b"".join(b" (\\Seen) {%d+}\r\n" % len(m) + m for m in MESSAGES) + last + b"\r\n"


def test_a_rename_pipelined_after_a_staged_multiappend_renames_the_mailbox_with_every_message(
        proxy_factory, no_multiappend):
    w = _session(proxy_factory, no_multiappend)
    w.send(_multiappend() + b"b RENAME Box Other\r\nc STATUS Other (MESSAGES)\r\n")
    lines = w.until_tagged(b"c")
    assert [line[:4] for line in lines if line[:2] in (b"a ", b"b ", b"c ")] == [b"a OK", b"b OK", b"c OK"], lines
    assert b"* STATUS Other (MESSAGES 3)\r\n" in lines
    w.close()
    assert contents(no_multiappend, "alice", "Box") == []
    assert len(contents(no_multiappend, "alice", "Other")) == 3


def test_a_rename_pipelined_after_a_refused_staged_multiappend_renames_the_empty_mailbox(
        proxy_factory, no_multiappend):
    w = _session(proxy_factory, no_multiappend)
    w.send(_multiappend(b" {0+}\r\n") + b"b RENAME Box Other\r\n")  # RFC 3502: a zero-length literal fails it all
    lines = w.until_tagged(b"b")
    assert lines[-2].startswith(b"a NO ") and lines[-1].startswith(b"b OK"), lines
    w.close()
    assert contents(no_multiappend, "alice", "Other") == []
    with no_multiappend.client("alice") as m:
        assert not any(b"Box" in line or b"referral-proxy" in line for line in m.list()[1]), m.list()


def _beside_b1(proxy_factory, backend: Dovecot, *made: str) -> Wire:
    """A session of a proxy whose S/* lives on *backend* (no MULTIAPPEND), the rest on b1; *made* created there."""
    backend.reset_mail("alice")
    with backend.client("alice") as m:
        for name in made:
            m.create(name)
    proxy = proxy_factory({"backends": {"x": {"endpoint": backend.endpoint, "url": backend.url}}},
                          rules=[{"mailbox": "S/*", "backend": "x"}])
    w = Wire(proxy.host, proxy.port)
    w.login()
    return w


@pytest.mark.parametrize("run", range(3))
def test_a_refused_staged_append_is_answered_before_commands_sent_after_it_to_other_backends(
        proxy_factory, fleet, no_multiappend, run):
    """Probe j2 of stop 59: ``a APPEND S/none {n+}`` (S/* on a backend without MULTIAPPEND, S/none missing) then
    ``b NOOP`` and ``c CREATE S/none`` in one write: b and c were answered before a's NO [TRYCREATE] (20 of 20),
    the client reading CREATE OK, then TRYCREATE for the same name. Dovecot alone answers a, b, c."""
    w = _beside_b1(proxy_factory, no_multiappend)
    m = MESSAGES[0]
    w.send(b"a APPEND S/none {%d+}\r\n%s\r\nb NOOP\r\nc CREATE S/none\r\nd APPEND S/none (\\Seen) {%d+}\r\n%s"
           b" {%d+}\r\n%s\r\ne NOOP\r\n" % (len(m), m, len(m), m, len(m), m))
    lines = w.until_tagged(b"e")
    tagged = [line[:2] + line.split(b" ")[1] + (b" " + line.split(b" ")[2][:10] if line[2:4] == b"NO" else b"")
              for line in lines if line[:2] in (b"a ", b"b ", b"c ", b"d ", b"e ")]
    assert tagged == [b"a NO [TRYCREATE", b"b OK", b"c OK", b"d OK", b"e OK"], lines
    w.close()
    assert len(contents(no_multiappend, "alice", "S/none")) == 2


def test_the_selected_mailbox_deleted_behind_a_staged_append_ends_with_dovecots_own_bye(
        proxy_factory, fleet, no_multiappend):
    """Probe j5 of stop 59: ``SELECT S/a``, a staged APPEND to it, ``DELETE S/a``, another APPEND, ``NOOP`` in one
    write: Dovecot says ``* BYE Selected mailbox was deleted, have to disconnect.``; through the proxy that BYE, queued
    behind the APPEND's answer, was dropped with the connection and the client read "Mail server connection lost"."""
    w = _beside_b1(proxy_factory, no_multiappend, "S/a")
    m = MESSAGES[0]
    w.send(b"s SELECT S/a\r\na APPEND S/a {%d+}\r\n%s\r\nb DELETE S/a\r\nc APPEND S/a {%d+}\r\n%s\r\nd NOOP\r\n"
           % (len(m), m, len(m), m))
    lines = w.lines_until(ConnectionError, OSError)
    w.close()
    byes = [line for line in lines if line.startswith(b"* BYE")]
    assert byes and byes[-1].startswith(b"* BYE Selected mailbox was deleted"), [line[:60] for line in lines]
    with no_multiappend.client("alice") as m:
        assert not any(b"S/a" in line or b"referral-proxy" in line for line in m.list()[1]), m.list()
