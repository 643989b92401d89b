"""RFC 3502 to the letter against real Dovecot (issue 15): no message body ever runs as a
command; the IESG note's example and the published one answered as direct Dovecot answers
them; MULTIAPPEND atomic for everyone on a backend without it (a staging mailbox, then one
COPY), also without UIDPLUS. Judged by a census of the backends, and beside direct Dovecot."""

from __future__ import annotations

import hashlib
import itertools
import re
import socket
import time
from dataclasses import dataclass

import pytest
from conftest import dovecot_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imapwire import Wire
from mailcheck import contents, same_messages

from referral_proxy.fleet import Dovecot
from referral_proxy.staging import STAGING_PREFIX

pytestmark = pytest.mark.usefixtures("clean_mail")

_TIMING = re.compile(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)")


def _limited(name: str, host: str, caps: str) -> Dovecot:
    extra = "protocol imap {\n  imap_capability = %s\n}\n" % caps
    return Dovecot(name, host, dovecot_root() / name, extra_config=extra)


@pytest.fixture(scope="module")
def no_multiappend():
    d = _limited("rfc-nomulti", "127.0.0.9", "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT NAMESPACE "
                 "CHILDREN MOVE")  # the commit is a MOVE
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def no_uidplus():
    d = _limited("rfc-bare", "127.0.0.10", "IMAP4rev1 SASL-IR ID LITERAL+")  # the commit is a COPY
    d.start()
    yield d
    d.stop()


def _proxy_to(proxy_factory, backend: Dovecot, **proxy):
    return proxy_factory({"backends": {"x": {"endpoint": backend.endpoint, "url": backend.url}}, "map": {"default": "x"}},
                         **proxy)


# -- a scripted client: literals synchronizing or not, as a careful client sends them ----------------


@dataclass(frozen=True)
class Message:
    body: bytes
    flags: bytes = b"(\\Seen)"
    date: bytes = b'"01-Feb-2021 10:20:30 +0100"'
    sync: bool = True


@dataclass(frozen=True)
class Outcome:
    answer: bytes  # the APPEND's tagged line, timing text removed
    lines: tuple[bytes, ...]  # everything the server said for it
    next_answer: bytes  # the tagged answer to the command after it


def run_append(host: str, port: int, user: str, mailbox: bytes, messages: list[Message]) -> Outcome:
    """``a APPEND mailbox msg...`` then ``n NOOP``. A synchronizing literal is sent only after
    "+"; a tagged answer ends the command (nothing more of it is sent)."""
    w = Wire(host, port, timeout=20)
    w.login(user)
    lines: list[bytes] = []
    w.send(b"a APPEND " + mailbox)
    answered = False
    for m in messages:
        head = b" " + b" ".join(x for x in (m.flags, m.date) if x)
        if m.sync:
            w.send(head + b" {%d}\r\n" % len(m.body))
            line = w.line()
            lines.append(line)
            if not line.startswith(b"+"):
                answered = True
                break
            w.send(m.body)
        else:
            w.send(head + b" {%d+}\r\n" % len(m.body) + m.body)
    if not answered:
        w.send(b"\r\n")
        lines += w.until_tagged(b"a")
    answer = next(line for line in lines if line.startswith(b"a "))
    rest = w.cmd(b"n", b"NOOP")  # whatever a body run as commands answered comes first
    w.close()
    return Outcome(_TIMING.sub(b"", answer), tuple(lines), rest[-1])


def _status(line: bytes) -> bytes:
    """``a NO [TRYCREATE] ...`` -> ``a NO [TRYCREATE``: tag, status and code (texts are each server's)."""
    m = re.match(rb"(\S+ (?:OK|NO|BAD))( \[[A-Z]+)?", line)
    assert m, line
    return m.group(0)


def _mailboxes(backend: Dovecot, user: str) -> set[bytes]:
    with backend.client(user) as m:
        return {line.rsplit(b" ", 1)[-1].strip(b'"') for line in m.list()[1] if line}


# -- the property: a bad element at any position, sync or LITERAL+, against direct Dovecot ----------

_KINDS = [None, "flag-recent", "flag-bogus", "flag-nonatom", "date", "date-garbage", "zero", "mailbox", "quota"]
_counter = itertools.count(1)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(_KINDS))
    bad_at = draw(st.integers(0, n - 1))
    sync = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    sizes = draw(st.lists(st.sampled_from([40, 700, 3000, 4096, 4097, 6000]), min_size=n, max_size=n))
    return n, kind, bad_at, sync, sizes


_BAD_FLAGS = {"flag-recent": b"(\\Seen \\Recent)", "flag-bogus": b"(\\Bogus)", "flag-nonatom": b'(\\Seen "x")'}
_BAD_DATES = {"date": b'"31-Foo-2021 10:20:30 +0100"', "date-garbage": b'"yesterday"'}


def _messages(case, seq: int) -> tuple[list[Message], bytes]:
    n, kind, bad_at, sync, sizes = case
    out = []
    for i in range(n):
        # Every body holds lines that would run as commands if it were read as such.
        head = (b"Subject: case %d message %d\r\n\r\n8-bit: caf\xe9 \xff\x80\r\nx1 CREATE Inj%d\r\n"
                b"x2 CREATE Shared/Inj%d\r\n" % (seq, i, seq, seq))  # RFC 3502: 8-bit characters are permitted
        size = sizes[i]
        body = head + b"y" * max(0, size - len(head) - 2) + b"\r\n"
        flags, date = b"(\\Seen $Work)" if i % 2 else b"(\\Flagged)", b'"%02d-Mar-2021 10:20:30 +0100"' % (i + 1)
        if i == bad_at:
            flags = _BAD_FLAGS.get(kind, flags)
            date = _BAD_DATES.get(kind, date)
            if kind == "zero":
                body = b""
            elif kind == "quota":
                body = head + b"q" * 30000 + b"\r\n"  # over the quota user's 20 KB
        out.append(Message(body, flags, date, sync[i]))
    return out, (b"Missing%d" % seq if kind == "mailbox" else b"T%d" % seq)


def _check_property(proxy, direct: Dovecot, label: str) -> None:
    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(cases())
    def run(case):
        seq = next(_counter)
        messages, target = _messages(case, seq)
        user = "quota" if case[1] == "quota" else "alice"
        results = {}
        for side, (host, port) in (("proxy", (proxy.host, proxy.port)), ("direct", (direct.host, direct.port))):
            box = (b"D" if side == "direct" else b"P") + target
            if not box[1:].startswith(b"Missing"):
                with direct.client(user) as m:
                    m.create(box.decode())
            results[side] = (run_append(host, port, user, box, messages), contents(direct, user, box.decode()))
            names = _mailboxes(direct, user)
            assert not any(name.startswith(STAGING_PREFIX) for name in names), (label, case)  # staging removed
            if side == "proxy" or all(m.sync for m in messages):
                # Through the proxy no body ever runs as commands; nor with direct Dovecot when it
                # asked for every literal ("+"): with LITERAL+ it reads a refused one as commands.
                assert not any(b"Inj%d" % seq in name for name in names), (side, label, case, results[side])
        (d_out, d_stored), (p_out, p_stored) = results["direct"], results["proxy"]
        where = f"{label} {case}: direct {d_out.lines} proxy {p_out.lines}"
        if label.endswith("no UIDPLUS"):  # Dovecot sends APPENDUID even when not announcing UIDPLUS
            assert _status(p_out.answer)[1:].split(b" [APPENDUID")[0] == _status(d_out.answer)[1:].split(
                b" [APPENDUID")[0], where
        else:
            assert _status(p_out.answer)[1:] == _status(d_out.answer)[1:], where
        assert p_out.next_answer.startswith(b"n OK"), where  # the client's next command is answered
        assert d_out.next_answer.startswith(b"n OK"), where
        assert same_messages(p_stored, d_stored), where
        assert (p_out.answer.split()[1] == b"OK") == bool(p_stored), where  # all or nothing

    run()


def test_no_body_ever_runs_as_a_command_multiappend_backend(proxy_factory, fleet):
    _check_property(proxy_factory(), fleet["b1"], "MULTIAPPEND")


def test_no_body_ever_runs_as_a_command_staging_backend(proxy_factory, no_multiappend):
    _check_property(_proxy_to(proxy_factory, no_multiappend), no_multiappend, "staging")


def test_no_body_ever_runs_as_a_command_staging_without_uidplus(proxy_factory, no_uidplus):
    _check_property(_proxy_to(proxy_factory, no_uidplus), no_uidplus, "staging, no UIDPLUS")


def test_a_message_over_the_proxy_limit_cancels_the_whole_command(proxy_factory, fleet, no_multiappend):
    for backend, proxy in ((fleet["b1"], proxy_factory(max_message=5000)),
                           (no_multiappend, _proxy_to(proxy_factory, no_multiappend, max_message=5000))):
        backend.reset_mail("alice")
        with backend.client("alice") as m:
            m.create("Big")
        for sync in (True, False):
            messages = [Message(b"Subject: small\r\n\r\nx1 CREATE Injected\r\n", sync=sync),
                        Message(b"x1 CREATE Injected\r\n" * 400, sync=sync)]
            out = run_append(proxy.host, proxy.port, "alice", b"Big", messages)
            assert out.answer.startswith(b"a NO [TOOBIG] ") and out.next_answer.startswith(b"n OK"), out
        assert contents(backend, "alice", "Big") == []
        assert b"Injected" not in _mailboxes(backend, "alice")


# -- the IESG note's corrected example, and the published one, proxy beside direct Dovecot ----------

_PUBLISHED = [  # RFC 3502 6.3.11 as published (with its addresses), and the command's final CRLF
    b"A003 APPEND saved-messages (\\Seen) {329}\r\n",
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\nFrom: Fred Foobar <foobar@Blurdybloop.example.COM>\r\n"
    b"Subject: afternoon meeting\r\nTo: mooch@owatagu.example.net\r\n"
    b"Message-Id: <B27397-0100000@Blurdybloop.example.COM>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\nHello Joe, do you think we can meet at 3:30 tomorrow?\r\n"
    b' (\\Seen) " 7-Feb-1994 22:43:04 -0800" {295}\r\n',
    b"Date: Mon, 7 Feb 1994 22:43:04 -0800 (PST)\r\nFrom: Joe Mooch <mooch@OWaTaGu.example.net>\r\n"
    b"Subject: Re: afternoon meeting\r\nTo: foobar@blurdybloop.example.com\r\n"
    b"Message-Id: <a0434793874930@OWaTaGu.example.net>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n3:30 is fine with me.\r\n\r\n",
    b"A004 APPEND bogusname (\\Flagged) {1023}\r\n",
    b"A005 APPEND test (\\Flagged) {99}\r\n",
    b"Date: Mon, 7 Feb 2000 22:43:04 -0800 (PST)\r\nFrom: Fred Foobar <foobar@Blurdybloop.example.COM>\r\n"
    b"Subject: hmm...\r\n {35403}\r\n",
    b"A006 NOOP\r\n",
]

_NOTE = [  # the IESG note's corrected example, its bytes as the note prints them
    b"A003 APPEND saved-messages (\\Seen) {329}\r\n",
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\nFrom: Fred Foobar <[EMAIL PROTECTED]>\r\n"
    b"Subject: afternoon meeting\r\nTo: [EMAIL PROTECTED]\r\nMessage-Id: <[EMAIL PROTECTED]>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n"
    b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"
    b'(\\Seen) " 7-Feb-1994 22:43:04 -0800" {286}\r\n',
    b"Date: Mon, 7 Feb 1994 22:43:04 -0800 (PST)\r\nFrom: Joe Mooch <[EMAIL PROTECTED]>\r\n"
    b"Subject: Re: afternoon meeting\r\nTo: [EMAIL PROTECTED]\r\nMessage-Id: <[EMAIL PROTECTED]>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n3:30 is fine with me.\r\n\r\n",
    b"A004 APPEND bogusname (\\Flagged) {1023}\r\n",
    b"A005 APPEND test (\\Flagged) {100}\r\n",
    b"Date: Mon, 7 Feb 2000 22:43:04 -0800 (PST)\r\nFrom: Fred Foobar <[EMAIL PROTECTED]>\r\n"
    b"Subject: hmm...\r\n{35403}\r\n",
    b"A006 NOOP\r\n",
]


def _replay(host: str, port: int, script: list[bytes]) -> list[bytes]:
    """Each write as the example shows it, waiting until the server is quiet after it; every
    line it sends, normalised (no timings, UIDVALIDITY; of a refusal only tag, status, code)."""
    w = Wire(host, port, timeout=10)
    w.login("quota")
    out: list[bytes] = []
    for chunk in script[:-1]:
        w.send(chunk)
        w.sock.settimeout(0.15)  # a line late for this write is read at the next: only their order counts
        try:
            while True:
                out.append(w.line())
        except (TimeoutError, OSError):
            pass
    w.sock.settimeout(10)
    out += w.cmd(*script[-1].rstrip(b"\r\n").split(b" ", 1))  # the last command's answer ends it
    w.close()
    normal = []
    for line in out:
        line = _TIMING.sub(b"", line)
        line = re.sub(rb"\[APPENDUID \d+ ", b"[APPENDUID * ", line)
        if line.startswith(b"+"):
            line = b"+"
        elif re.match(rb"\S+ (NO|BAD) ", line):
            line = _status(line)
        normal.append(line)
    return normal


# The note's bytes with the published sizes ({295}, {99} instead of {286}, {100}): literals end
# inside other lines, and both servers answer what follows them line by line.
_NOTE_PUBLISHED_SIZES = [c.replace(b"{286}", b"{295}").replace(b"{100}", b"{99}") for c in _NOTE]


@pytest.mark.parametrize("script", [_NOTE, _NOTE_PUBLISHED_SIZES, _PUBLISHED],
                         ids=["iesg-note", "note-published-sizes", "published"])
@pytest.mark.parametrize("staging", [False, True], ids=["multiappend", "staging"])
def test_rfc3502_examples_answer_as_direct_dovecot(proxy_factory, fleet, no_multiappend, script, staging):
    backend = no_multiappend if staging else fleet["b1"]
    proxy = _proxy_to(proxy_factory, backend)

    def prepare():
        backend.reset_mail("quota")
        with backend.client("quota") as m:  # 20 KB quota
            m.create("saved-messages")
            m.create("test")

    prepare()
    direct = _replay(backend.host, backend.port, script)
    direct_saved = {box: contents(backend, "quota", box) for box in ("saved-messages", "test")}
    prepare()
    through = _replay(proxy.host, proxy.port, script)
    assert through == direct
    for box, saved in direct_saved.items():  # flags and bodies (a message given no date is dated on arrival)
        assert sorted(s[1::2] for s in contents(backend, "quota", box)) == sorted(s[1::2] for s in saved), box
    assert not any(line.startswith(b"* BYE") for line in through)
    assert any(line.startswith(b"A004 NO [TRYCREATE") for line in through)
    assert any(line.startswith(b"A006 OK") for line in through)


# -- staging: what other sessions see, during and after ------------------------------------------------


def _status_of(host: str, port: int, user: str, box: str) -> dict[bytes, int]:
    w = Wire(host, port)
    w.login(user)
    reply = w.cmd(b"s", b"STATUS %s (MESSAGES UIDNEXT)" % box.encode())
    w.close()
    m = re.search(rb"\(MESSAGES (\d+) UIDNEXT (\d+)\)", reply[0])
    assert m, reply
    return {b"MESSAGES": int(m.group(1)), b"UIDNEXT": int(m.group(2))}


def _listed(host: str, port: int, user: str) -> list[bytes]:
    w = Wire(host, port)
    w.login(user)
    out = []
    for tag, command in ((b"l1", b'LIST "" "*"'), (b"l2", b'LIST "" "%"'), (b"l3", b'LIST "" "referral-proxy*"'),
                         (b"l4", b'LIST "" "*staging*"'), (b"l5", b'LSUB "" "*"'), (b"l6", b'RLIST "" "*"'),
                         (b"l7", b'LIST (SUBSCRIBED) "" "*" RETURN (STATUS (MESSAGES))'),
                         (b"l8", b'RLSUB "" "%"')):
        out += w.cmd(tag, command)
    w.close()
    return out


@pytest.mark.parametrize("caps", ["uidplus", "bare"])
def test_staged_messages_appear_all_at_once_or_never(proxy_factory, no_multiappend, no_uidplus, caps):
    backend = no_multiappend if caps == "uidplus" else no_uidplus
    proxy = _target(proxy_factory, backend)
    bodies = [b"Subject: staged %d\r\n\r\n%s\r\n" % (i, b"z" * (200 * i)) for i in range(3)]
    before = _status_of(proxy.host, proxy.port, "alice", "Target")
    for cancel in (True, False):
        w = Wire(proxy.host, proxy.port)
        w.login()
        w.send(b"a APPEND Target (\\Seen) {%d+}\r\n" % len(bodies[0]) + bodies[0]
               + b" {%d+}\r\n" % len(bodies[1]) + bodies[1])
        time.sleep(0.3)  # two messages are staged on the backend now
        with backend.client("alice") as m:  # direct Dovecot shows the staging mailbox ...
            staged = [line for line in m.list()[1] if STAGING_PREFIX in line]
        assert len(staged) == 1, staged
        listed = _listed(proxy.host, proxy.port, "alice")  # ... the proxy never
        assert listed and not any(STAGING_PREFIX in line or b"staging" in line for line in listed), listed
        assert _status_of(proxy.host, proxy.port, "alice", "Target") == before
        if cancel:
            w.send(b" {0+}\r\n\r\n")
            assert w.until_tagged(b"a")[-1].startswith(b"a NO ")
        else:
            w.send(b" {%d+}\r\n" % len(bodies[2]) + bodies[2] + b"\r\n")
            answer = w.until_tagged(b"a")[-1]
            if caps == "uidplus":
                assert re.fullmatch(rb"a OK \[APPENDUID \d+ 1:3\] Append completed.\r\n", answer), answer
            else:
                assert answer == b"a OK Append completed.\r\n"
        assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
        w.close()
        after = _status_of(proxy.host, proxy.port, "alice", "Target")
        if cancel:
            assert after == before  # nothing, and UIDNEXT did not move
        else:
            assert after == {b"MESSAGES": 3, b"UIDNEXT": before[b"UIDNEXT"] + 3}
        with backend.client("alice") as m:
            assert not any(STAGING_PREFIX in line for line in m.list()[1] if line)
    stored = contents(backend, "alice", "Target")
    assert [s[3] for s in stored] == [hashlib.sha256(b).hexdigest() for b in bodies]
    assert all(s[1] == {b"\\Seen"} for s in stored[:1])


def test_a_selected_target_sees_the_staged_messages_arrive(proxy_factory, no_multiappend):
    no_multiappend.reset_mail("alice")
    proxy = _proxy_to(proxy_factory, no_multiappend)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    reply = w.cmd(b"a", b"APPEND INBOX {5+}\r\nhello {5+}\r\nworld")
    assert b"* 2 EXISTS\r\n" in reply and re.match(rb"a OK \[APPENDUID \d+ 1:2\]", reply[-1]), reply
    assert w.cmd(b"f", b"FETCH 1:* (FLAGS)")[-1].startswith(b"f OK")  # still selected, on the same mailbox
    w.close()
    assert len(contents(no_multiappend, "alice", "INBOX")) == 2


def _target(proxy_factory, backend: Dovecot):
    """alice's empty mailbox Target on *backend*, and a proxy in front of it."""
    backend.reset_mail("alice")
    with backend.client("alice") as m:
        m.create("Target")
    return _proxy_to(proxy_factory, backend)


def test_staging_names_never_collide_across_sessions(proxy_factory, no_multiappend):
    proxy = _target(proxy_factory, no_multiappend)
    wires = []
    for i in range(4):
        w = Wire(proxy.host, proxy.port)
        w.login()
        w.send(b"a APPEND Target {3+}\r\nab%d" % i)
        wires.append(w)
    time.sleep(0.3)
    with no_multiappend.client("alice") as m:
        staged = [line for line in m.list()[1] if STAGING_PREFIX in line]
    assert len(staged) == 4, staged
    for w in wires:
        w.send(b"\r\n")
    for w in wires:
        assert w.until_tagged(b"a")[-1].startswith(b"a OK [APPENDUID ")
        w.close()
    assert len(contents(no_multiappend, "alice", "Target")) == 4


def test_the_client_leaving_mid_staging_leaves_nothing(proxy_factory, no_multiappend):
    proxy = _target(proxy_factory, no_multiappend)
    body = b"x" * 100_000
    for cut in (b" {%d+}\r\n" % len(body) + body[:5000], b""):  # inside a literal, between two messages
        w = Wire(proxy.host, proxy.port)
        w.login()
        w.send(b"a APPEND Target {%d+}\r\n" % len(body) + body + cut)
        time.sleep(0.3)
        w.sock.shutdown(socket.SHUT_RDWR)
        w.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with no_multiappend.client("alice") as m:
            if not any(STAGING_PREFIX in line for line in m.list()[1] if line):
                break
        time.sleep(0.2)
    else:
        pytest.fail("a staging mailbox was left behind")
    assert contents(no_multiappend, "alice", "Target") == []


def test_staging_near_the_quota_moves_where_it_can(proxy_factory, no_multiappend, no_uidplus):
    """14 KB in two messages for a 20 KB quota: a MULTIAPPEND fits. Staged then MOVEd it fits too;
    staged then COPYed (a backend without MOVE) the staging mailbox's copies count until it is
    deleted, so the COPY is refused as over quota (a known cost of emulating MULTIAPPEND)."""
    bodies = [b"Subject: near %d\r\n\r\n" % i + b"n" * 7000 + b"\r\n" for i in range(2)]
    for backend, fits in ((no_multiappend, True), (no_uidplus, False)):
        backend.reset_mail("quota")
        proxy = _proxy_to(proxy_factory, backend)
        out = run_append(proxy.host, proxy.port, "quota", b"INBOX", [Message(b, sync=False) for b in bodies])
        assert out.answer.startswith(b"a OK" if fits else b"a NO [OVERQUOTA]"), out
        assert len(contents(backend, "quota", "INBOX")) == (2 if fits else 0)
        assert not any(STAGING_PREFIX in name for name in _mailboxes(backend, "quota"))


_NAMES = [b'"a%b"', b'"a*b"', b'"Caf\xe9"', b'"S/\xc3\xa9"', b'"&Jjo"', b'"a\\"q"', b'"back\\\\slash"', b"{3+}\r\nx\ry", b'""']


@pytest.mark.parametrize("staging", [False, True], ids=["multiappend", "staging"])
def test_hostile_target_names_are_answered_as_dovecot_answers_them(proxy_factory, fleet, no_multiappend, staging):
    backend = no_multiappend if staging else fleet["b1"]
    backend.reset_mail("alice")
    proxy = _proxy_to(proxy_factory, backend)
    for name in _NAMES:
        answers = [_TIMING.sub(b"", run_append(host, port, "alice", name, [Message(b"hello")]).answer)
                   for host, port in ((backend.host, backend.port), (proxy.host, proxy.port))]
        assert answers[1] == answers[0], name
    assert not any(STAGING_PREFIX in n for n in _mailboxes(backend, "alice"))


# -- a crash mid-staging: only a staging mailbox is left, and recovery removes it ------------------


def _staged(backend: Dovecot, user: str) -> dict[bytes, int]:
    """The staging mailboxes on *backend* (seen directly) and how many messages each holds."""
    out = {}
    with backend.client(user) as m:
        for name in _mailboxes(backend, user):
            if STAGING_PREFIX in name:
                typ, data = m.status(name.decode(), "(MESSAGES)")
                found = re.search(rb"MESSAGES (\d+)", data[0] or b"") if typ == "OK" else None
                out[name] = int(found.group(1)) if found else -1
    return out


def _wait_for(check, what: str, seconds: float = 40.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"never: {what}")


@pytest.mark.parametrize("how", ["recover", "start-up", "before-create"])
def test_a_proxy_killed_mid_staging_leaves_only_a_staging_mailbox_that_recovery_removes(
        proxy_factory, no_multiappend, tmp_path, how):
    """SIGKILL while two messages are staged (or right after the journal entry, before the
    CREATE): the target never shows a message, and ``recover`` or the next proxy's start-up
    deletes the staging mailbox the journal names (op "staging"), and nothing else."""
    from movecheck import cli, faulty, journal_empty

    from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

    backend = no_multiappend
    backend.reset_mail("alice")
    with backend.client("alice") as m:
        m.create("Target")
        m.create("Kept")
    config = {"backends": {"x": {"endpoint": backend.endpoint, "url": backend.url, "master_user": MASTER_USER,
                                 "master_password": MASTER_PASSWORD}},
              "map": {"default": "x", "store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    command = faulty("--kill-at", "staging:1") if how == "before-create" else None
    proxy = proxy_factory(config, command=command)
    bodies = [b"Subject: crash %d\r\n\r\n%s\r\n" % (i, b"c" * 3000) for i in range(2)]
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"a APPEND Target {%d+}\r\n" % len(bodies[0]) + bodies[0] + b" {%d+}\r\n" % len(bodies[1]) + bodies[1])
    if how == "before-create":
        assert proxy.process.wait(timeout=30) != 0  # killed by its own hook, the entry written
        assert _staged(backend, "alice") == {}
    else:
        _wait_for(lambda: list(_staged(backend, "alice").values()) == [2], "two messages staged")
        proxy.kill()
    w.close()
    assert contents(backend, "alice", "Target") == []
    if how == "start-up":
        again = proxy_factory(config)  # the same store: its start-up recovery deletes it
        # ... then ends the entry (staging.drop_staging): stopped between the two (the DELETE seen, a
        # loaded machine), it left the entry to the next `recover` below ('no staging mailbox was left')
        _wait_for(lambda: _staged(backend, "alice") == {} and journal_empty(again),
                  "the staging mailbox removed and its entry ended at start-up")
        again.stop()
    else:
        recovered = cli("recover", "--config", str(proxy.config_path))
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        said = "no staging mailbox was left" if how == "before-create" else "staging mailbox deleted"
        assert "APPEND to Target staged in referral-proxy-staging-" in recovered.stdout and said in recovered.stdout, \
            recovered.stdout
        assert _staged(backend, "alice") == {}
    assert "nothing to recover" in cli("recover", "--config", str(proxy.config_path)).stdout
    assert contents(backend, "alice", "Target") == []
    assert {b"INBOX", b"Target", b"Kept"} == _mailboxes(backend, "alice")  # nothing else deleted


# -- one APPEND per message: the proxy's own "+" for a target that just took one -------------------


def test_an_append_to_a_target_deleted_since_it_took_one_is_refused_after_its_body_and_nothing_runs(
        proxy_factory, fleet):
    """The next sync APPEND to the mailbox that took the last one is answered "+" by the proxy
    (appends.Taker). Deleted meanwhile by another client, the backend refuses it after the
    body: the client gets NO [TRYCREATE], nothing is appended, no line of the body runs."""
    backend = fleet["b1"]
    backend.reset_mail("alice")
    with backend.client("alice") as m:
        m.create("Box")
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    first = b"Subject: one\r\n\r\nhello\r\n"
    w.send(b"a APPEND Box {%d}\r\n" % len(first))
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(first + b"\r\n")
    assert w.until_tagged(b"a")[-1].startswith(b"a OK [APPENDUID ")
    with backend.client("alice") as m:
        m.delete("Box")
    body = b"Subject: two\r\n\r\n" + b"x1 CREATE Smuggled\r\nx2 DELETE INBOX\r\n" * 200
    w.send(b"b APPEND Box (\\Seen) {%d}\r\n" % len(body))
    assert w.line() == b"+ Ready for literal data\r\n"  # the proxy's own: the backend was not asked
    w.send(body + b"\r\n")
    assert w.until_tagged(b"b")[-1].startswith(b"b NO [TRYCREATE] ")
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.send(b"c APPEND Box {%d}\r\n" % len(first))  # refused last time: the backend decides first again
    assert w.line().startswith(b"c NO [TRYCREATE] ")
    w.close()
    assert b"Smuggled" not in _mailboxes(backend, "alice") and b"Box" not in _mailboxes(backend, "alice")
    assert contents(backend, "alice", "INBOX") == []


# -- spaces before the command's final CRLF: Dovecot takes them (it skips spaces between arguments) --


@pytest.mark.parametrize("staging", [False, True], ids=["multiappend", "staging"])
def test_spaces_after_the_last_literal_end_the_command_as_with_dovecot(proxy_factory, fleet, no_multiappend, staging):
    """``a APPEND box (\\Seen) {n}`` + body + ``" \\r\\n"``: Dovecot appends (OK), the proxy said BAD
    ``missing message literal`` and appended nothing. Both messages of a MULTIAPPEND ending so, and
    a pipelined NOOP in the same write, answered as directly; the census has the same messages."""
    backend = no_multiappend if staging else fleet["b1"]
    proxy = _proxy_to(proxy_factory, backend)
    backend.reset_mail("alice")
    bodies = [b"Subject: trailing %d\r\n\r\nx1 CREATE Inj\r\n" % i for i in range(2)]
    stored = {}
    for side, (host, port) in (("direct", (backend.host, backend.port)), ("proxy", (proxy.host, proxy.port))):
        box = b"Sp" + side.encode()
        with backend.client("alice") as m:
            m.create(box.decode())
        w = Wire(host, port)
        w.login()
        answers = []
        for tag, tail in ((b"a", b" \r\n"), (b"b", b"   \r\n")):
            w.send(b"%s APPEND %s (\\Seen) {%d+}\r\n%s {%d+}\r\n%s%sn NOOP\r\n" % (
                tag, box, len(bodies[0]), bodies[0], len(bodies[1]), bodies[1], tail))
            reply = w.until_tagged(b"n")
            answers.append([_TIMING.sub(b"", line).split(b" [APPENDUID")[0].split(b" Append")[0] for line in reply])
        w.close()
        stored[side] = (answers, contents(backend, "alice", box.decode()))
    assert stored["proxy"][0] == stored["direct"][0] == [[b"a OK", b"n OK NOOP completed.\r\n"],
                                                         [b"b OK", b"n OK NOOP completed.\r\n"]]
    census = {side: sorted((s[1], s[3]) for s in stored[side][1]) for side in stored}  # dated on arrival
    assert census["proxy"] == census["direct"] and len(census["proxy"]) == 4
    assert b"Inj" not in _mailboxes(backend, "alice")


@pytest.mark.parametrize("staging", [False, True], ids=["multiappend", "staging"])
def test_rfc_6855_utf8_message_data_answered_as_dovecot_without_utf8_accept(proxy_factory, fleet, no_multiappend, staging):
    """``UTF8 (~{n}...)`` to Dovecot 2.3 (no UTF8=ACCEPT): BAD before the literal, as directly (main:
    BAD too, from the proxy's parser); a second message so: the whole command BAD, nothing appended."""
    backend = no_multiappend if staging else fleet["b1"]
    proxy = _proxy_to(proxy_factory, backend)
    backend.reset_mail("alice")
    answers = {}
    for side, (host, port) in (("direct", (backend.host, backend.port)), ("proxy", (proxy.host, proxy.port))):
        got = []
        for tag, command in ((b"a", b"APPEND INBOX UTF8 (~{5+}\r\nworld)"),
                             (b"b", b"APPEND INBOX {5+}\r\nhello UTF8 (~{5+}\r\nworld)")):
            w = Wire(host, port)
            w.login()
            got.append(_status(w.cmd(tag, command)[-1]))
            got.append(w.cmd(b"n", b"NOOP")[-1][:4])
            w.close()
        answers[side] = got
    assert answers["proxy"] == answers["direct"] == [b"a BAD", b"n OK", b"b BAD", b"n OK"], answers
    assert contents(backend, "alice", "INBOX") == []



@pytest.mark.parametrize("staging", [False, True], ids=["multiappend", "staging"])
@pytest.mark.parametrize("meanwhile", ["DELETE Target", "RENAME Target Elsewhere"])
def test_a_target_deleted_or_renamed_by_another_session_mid_multiappend_gets_none(
        proxy_factory, fleet, no_multiappend, staging, meanwhile):
    """Two messages sent, the target deleted (or renamed) by another session straight on the
    backend, then the third and the command's end: NO as directly, and the census finds none of
    the three anywhere (not in the target, not under its new name, no staging mailbox left)."""
    backend = no_multiappend if staging else fleet["b1"]
    proxy = _proxy_to(proxy_factory, backend)
    bodies = [b"Subject: mid %d\r\n\r\n%s\r\n" % (i, b"m" * 300) for i in range(3)]
    answers = {}
    for side, (host, port) in (("direct", (backend.host, backend.port)), ("proxy", (proxy.host, proxy.port))):
        backend.reset_mail("alice")
        with backend.client("alice") as m:
            m.create("Target")
        w = Wire(host, port)
        w.login()
        w.send(b"a APPEND Target (\\Seen) {%d+}\r\n%s {%d+}\r\n%s" % (len(bodies[0]), bodies[0], len(bodies[1]), bodies[1]))
        if staging and side == "proxy":
            _wait_for(lambda: list(_staged(backend, "alice").values()) == [2], "two messages staged")
        else:
            time.sleep(0.3)
        with backend.client("alice") as m:
            assert m._simple_command(*meanwhile.split(" ", 1))[0] == "OK"
        w.send(b" {%d+}\r\n%s\r\n" % (len(bodies[2]), bodies[2]))
        answers[side] = _status(w.until_tagged(b"a")[-1])[:4]
        assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
        w.close()
        if staging and side == "proxy":
            _wait_for(lambda: _staged(backend, "alice") == {}, "the staging mailbox removed")
        names = _mailboxes(backend, "alice")
        assert not any(STAGING_PREFIX in n for n in names), names
        for box in names:
            assert contents(backend, "alice", box.decode()) == [], (side, box)
    assert answers["proxy"] == answers["direct"] == b"a NO", answers
