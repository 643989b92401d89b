"""MULTIAPPEND (RFC 3502) through the proxy to real Dovecot: streamed, atomic, with APPENDUID."""

from __future__ import annotations

import hashlib
import imaplib
import re
import time

import pytest
from conftest import dovecot_root  # noqa: E402  (the limited backends below)
from imapwire import Wire
from mailcheck import contents
from procmem import reset_peak, rss

from referral_proxy.fleet import Dovecot

pytestmark = pytest.mark.usefixtures("clean_mail")


def _message(i: int, size: int = 300) -> bytes:
    head = b"From: sender%d@example.test\r\nSubject: message %d\r\n\r\n" % (i, i)
    line = b"line of message %d\r\n" % i
    return head + line * max(1, (size - len(head)) // len(line))


def _fetch_all(backend: Dovecot, user: str, mailbox: str):
    return contents(backend, user, mailbox)


# -- the RFC's example, corrected per the IESG note ---------------------------------

MSG1 = (b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n"
        b"From: Fred Foobar <foobar@Blurdybloop.example.COM>\r\n"
        b"Subject: afternoon meeting\r\n"
        b"To: mooch@owatagu.example.net\r\n"
        b"Message-Id: <B27397-0100000@Blurdybloop.example.COM>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
        b"\r\n"
        b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n")
MSG2 = (b"Date: Mon, 7 Feb 1994 22:43:04 -0800 (PST)\r\n"
        b"From: Joe Mooch <mooch@OWaTaGu.example.net>\r\n"
        b"Subject: Re: afternoon meeting\r\n"
        b"To: foobar@blurdybloop.example.com\r\n"
        b"Message-Id: <a0434793874930@OWaTaGu.example.net>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
        b"\r\n"
        b"3:30 is fine with me.\r\n")
MSG3 = (b"Date: Mon, 7 Feb 2000 22:43:04 -0800 (PST)\r\n"
        b"From: Fred Foobar <foobar@blurdybloop.example.com>\r\n"
        b"Subject: hmm...\r\n")


def test_rfc3502_example_through_the_proxy(proxy_factory, fleet):
    with fleet["b1"].client("quota") as m:  # 20 KB quota
        m.create("saved-messages")
        m.create("test")
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login("quota")
    w.send(b"A003 APPEND saved-messages (\\Seen) {%d}\r\n" % len(MSG1))
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(MSG1 + b' (\\Seen) " 7-Feb-1994 22:43:04 -0800" {%d}\r\n' % len(MSG2))
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(MSG2 + b"\r\n")
    reply = w.line()
    assert re.fullmatch(rb"A003 OK \[APPENDUID \d+ 1:2\] .*\r\n", reply), reply
    w.send(b"A004 APPEND bogusname (\\Flagged) {1023}\r\n")
    assert w.line().startswith(b"A004 NO [TRYCREATE] ")  # before the client sends its literal
    w.send(b"A005 APPEND test (\\Flagged) {%d}\r\n" % len(MSG3))
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(MSG3 + b" {35403}\r\n")
    assert w.line().startswith(b"A005 NO [OVERQUOTA] ")  # before the 35403 bytes
    assert w.cmd(b"A006", b"NOOP")[-1].startswith(b"A006 OK")
    w.close()
    saved = _fetch_all(fleet["b1"], "quota", "saved-messages")
    assert [(s[1], s[3]) for s in saved] == [({b"\\Seen"}, hashlib.sha256(MSG1).hexdigest()),
                                             ({b"\\Seen"}, hashlib.sha256(MSG2).hexdigest())]
    assert saved[1][2] == time.mktime(imaplib.Internaldate2tuple(b'INTERNALDATE " 7-Feb-1994 22:43:04 -0800"'))
    assert _fetch_all(fleet["b1"], "quota", "test") == []  # A005 is all or nothing


def test_500_messages_in_one_command(proxy_factory, fleet):
    with fleet["b1"].client("alice") as m:
        m.create("Bulk")
    proxy = proxy_factory()
    messages = [_message(i, 200 + (i * 37) % 5000) for i in range(500)]
    flag_sets = [b"(\\Seen)", b"(\\Flagged $Work)", b"()", b"(\\Answered \\Seen)"]
    dates = [b'"%02d-Mar-2021 %02d:%02d:%02d +0100"' % (1 + i % 28, i % 24, i % 60, (i * 7) % 60) for i in range(500)]
    parts = [b"m APPEND Bulk"]
    for i, body in enumerate(messages):
        parts.append(b" %s %s {%d+}\r\n" % (flag_sets[i % 4], dates[i], len(body)) + body)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"".join(parts) + b"\r\n")
    reply = w.until_tagged(b"m")[-1]
    m = re.fullmatch(rb"m OK \[APPENDUID (\d+) 1:500\] .*\r\n", reply)
    assert m, reply
    w.close()
    stored = _fetch_all(fleet["b1"], "alice", "Bulk")
    assert [s[0] for s in stored] == list(range(1, 501))
    for i, (_uid, flags, date, digest) in enumerate(stored):
        assert digest == hashlib.sha256(messages[i]).hexdigest(), i
        assert flags == set(flag_sets[i % 4].strip(b"()").split()), i
        assert date == time.mktime(imaplib.Internaldate2tuple(b"INTERNALDATE " + dates[i])), i


def test_zero_length_literal_in_the_middle_appends_nothing(proxy_factory, fleet):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"z APPEND INBOX {5+}\r\nhello {0+}\r\n {5+}\r\nworld\r\n")
    assert w.line().startswith(b"z NO ")
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
    assert _fetch_all(fleet["b1"], "alice", "INBOX") == []


def test_client_disconnect_in_the_middle_appends_nothing(proxy_factory, fleet):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    body = _message(1, 3000)
    # Between two messages, and inside the second one's literal.
    w.send(b"d APPEND INBOX {%d+}\r\n" % len(body) + body + b" (\\Seen) {%d+}\r\n" % len(body) + body[:1000])
    time.sleep(0.3)
    w.close()
    time.sleep(0.5)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"e APPEND INBOX {%d+}\r\n" % len(body) + body)
    time.sleep(0.3)
    w.close()
    time.sleep(0.5)
    assert _fetch_all(fleet["b1"], "alice", "INBOX") == []


def test_backend_killed_in_the_middle_appends_nothing(proxy_factory, spare_backend):
    solo = spare_backend
    proxy = proxy_factory({"backends": {"solo": {"endpoint": solo.endpoint, "url": solo.url}},
                           "map": {"default": "solo"}})
    w = Wire(proxy.host, proxy.port)
    w.login()
    body = _message(1, 200_000)
    w.send(b"k APPEND INBOX {%d+}\r\n" % len(body) + body + b" {%d+}\r\n" % len(body) + body[:50_000])
    time.sleep(0.5)
    solo.kill()
    assert w.line().startswith(b"* BYE")
    w.close()
    solo.start()
    assert _fetch_all(solo, "alice", "INBOX") == []


def test_message_count_limit(proxy_factory, fleet):
    proxy = proxy_factory(max_append_messages=3)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"l APPEND INBOX" + b"".join(b" {3+}\r\nabc" for _ in range(4)) + b"\r\n")
    assert w.line() == b"l NO [LIMIT] Too many messages in one APPEND (limit 3); nothing was appended\r\n"
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
    assert _fetch_all(fleet["b1"], "alice", "INBOX") == []



def test_200mb_message_with_bounded_proxy_memory(proxy_factory, fleet):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login()
    size = 200 * 1024 * 1024
    chunk = (b"x" * 78 + b"\r\n") * 6553  # ~512 KB
    reset_peak(proxy.pid)
    before, _ = rss(proxy.pid)
    w.send(b"big APPEND INBOX {%d}\r\n" % size)
    assert w.line() == b"+ Ready for literal data\r\n"
    digest, sent = hashlib.sha256(), 0
    while sent < size:
        piece = chunk[: size - sent]
        w.send(piece)
        digest.update(piece)
        sent += len(piece)
    w.send(b"\r\n")
    assert w.until_tagged(b"big")[-1].startswith(b"big OK [APPENDUID ")
    _, peak = rss(proxy.pid)
    w.close()
    growth = peak - before
    print(f"proxy peak memory growth: {growth / 1e6:.1f} MB")
    assert growth < 32 * 1024 * 1024, f"proxy memory grew by {growth / 1e6:.1f} MB for a 200 MB message"
    with fleet["b1"].client("alice") as m:
        m.select("INBOX", readonly=True)
        assert m.fetch("1", "(RFC822.SIZE)")[1][0] == b"1 (RFC822.SIZE %d)" % size


def test_selected_mailbox_sees_exists_and_remote_append_for_unaware_session(proxy_factory, fleet):
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Inbox")
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    reply = w.cmd(b"a", b"APPEND INBOX {5+}\r\nhello {5+}\r\nworld")
    assert b"* 2 EXISTS\r\n" in reply and reply[-1].startswith(b"a OK [APPENDUID ")
    reply = w.cmd(b"r", b"APPEND Shared/Inbox {5+}\r\nhello")
    assert re.match(rb"r OK \[APPENDUID \d+ 1\]", reply[-1]), reply
    w.close()
    assert len(_fetch_all(fleet["b3"], "alice", "Shared/Inbox")) == 1
    assert len(_fetch_all(fleet["b1"], "alice", "INBOX")) == 2


# -- backends without MULTIAPPEND (Dovecot told not to announce it) ---------------------

def _limited(name: str, host: str, caps: str) -> Dovecot:
    extra = "protocol imap {\n  imap_capability = %s\n}\n" % caps
    return Dovecot(name, host, dovecot_root() / name, extra_config=extra)


@pytest.fixture(scope="module")
def no_multiappend():
    d = _limited("nomulti", "127.0.0.7", "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT NAMESPACE CHILDREN")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def bare_backend():
    d = _limited("bare", "127.0.0.8", "IMAP4rev1 SASL-IR ID LITERAL+")
    d.start()
    yield d
    d.stop()


def _proxy_to(proxy_factory, backend: Dovecot):
    return proxy_factory({"backends": {"x": {"endpoint": backend.endpoint, "url": backend.url}}, "map": {"default": "x"}})


def test_emulated_multiappend_joins_appenduids(proxy_factory, no_multiappend):
    no_multiappend.reset_mail("alice")
    proxy = _proxy_to(proxy_factory, no_multiappend)
    w = Wire(proxy.host, proxy.port)
    w.login()
    caps = w.cmd(b"c", b"CAPABILITY")[0].split()
    assert b"MULTIAPPEND" in caps  # the proxy's own, whatever the backend has
    bodies = [_message(i) for i in range(3)]
    w.send(b"e APPEND INBOX" + b"".join(b" (\\Flagged) {%d+}\r\n" % len(b) + b for b in bodies) + b"\r\n")
    reply = w.until_tagged(b"e")[-1]
    assert re.fullmatch(rb"e OK \[APPENDUID \d+ 1:3\] Append completed.\r\n", reply), reply
    w.close()
    stored = _fetch_all(no_multiappend, "alice", "INBOX")
    assert [s[3] for s in stored] == [hashlib.sha256(b).hexdigest() for b in bodies]


def test_emulated_multiappend_rolls_back_on_zero_length_literal(proxy_factory, no_multiappend):
    no_multiappend.reset_mail("alice")
    with no_multiappend.client("alice") as m:
        m.append("INBOX", r"(\Deleted)", None, b"Subject: keep me\r\n\r\nx\r\n")  # not ours: must survive
    proxy = _proxy_to(proxy_factory, no_multiappend)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"z APPEND INBOX {5+}\r\nhello {5+}\r\nworld {0+}\r\n\r\n")
    assert w.until_tagged(b"z")[-1].startswith(b"z NO Zero-length message")
    w.close()
    stored = _fetch_all(no_multiappend, "alice", "INBOX")
    assert len(stored) == 1 and b"\\Deleted" in stored[0][1]


def test_emulated_multiappend_rolls_back_on_backend_refusal(proxy_factory, no_multiappend):
    no_multiappend.reset_mail("quota")
    proxy = _proxy_to(proxy_factory, no_multiappend)
    w = Wire(proxy.host, proxy.port)
    w.login("quota")
    w.send(b"q APPEND INBOX {5+}\r\nhello {35403}\r\n")
    assert w.until_tagged(b"q")[-1].startswith(b"q NO [OVERQUOTA]")
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
    assert _fetch_all(no_multiappend, "quota", "INBOX") == []


def test_no_multiappend_no_uidplus_is_atomic_without_appenduid(proxy_factory, bare_backend):
    bare_backend.reset_mail("alice")
    proxy = _proxy_to(proxy_factory, bare_backend)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"t APPEND INBOX {5+}\r\nhello {5+}\r\nworld\r\n")
    assert w.until_tagged(b"t")[-1] == b"t OK Append completed.\r\n"  # staged, then one COPY
    assert w.cmd(b"o", b"APPEND INBOX {5+}\r\nalone")[-1] == b"o OK Append completed.\r\n"
    w.close()
    stored = _fetch_all(bare_backend, "alice", "INBOX")
    assert [s[3] for s in stored] == [hashlib.sha256(b).hexdigest() for b in (b"hello", b"world", b"alone")]
