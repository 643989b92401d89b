"""Hostile names and RFC 2193 referrals: what a referral-aware session is told about names a
remote Dovecot refuses, compared with that Dovecot directly."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]


def _same(line: bytes) -> bytes:
    return re.sub(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"", line)


@pytest.mark.parametrize("name", [b'"Shared/&AAA-"', b'"Shared/x&AAAAAA-"'])
def test_a_shifted_nul_is_not_valid_mutf7_and_never_referred(proxy_factory, fleet, name):
    """``&AAA-`` is U+0000 in modified base64. Dovecot refuses such a name in every command
    (``NO Mailbox name is not valid mUTF-7``; RFC 3501's CHAR8 has no NUL, so no client could send
    the name the URL stands for). The proxy took it for valid modified UTF-7 and referred it:
    ``NO [REFERRAL imap://alice;AUTH=*@b3/Shared/%00]``, a URL naming a mailbox that cannot exist."""
    with fleet["b1"].client("alice") as m:
        m.create("Work")
    proxy = proxy_factory(rules=RULES)
    commands = [(b"s", b"SELECT " + name), (b"t", b"STATUS %s (MESSAGES)" % name), (b"c", b"CREATE " + name),
                (b"d", b"DELETE " + name), (b"b", b"SUBSCRIBE " + name), (b"n", b"RENAME Work " + name)]
    answers = []
    for host, port in ((fleet["b3"].host, fleet["b3"].port), (proxy.host, proxy.port)):
        w = Wire(host, port)
        w.login()
        w.cmd(b"r", b'RLIST "" "*"')
        answers.append([_same(w.cmd(tag, command)[-1]) for tag, command in commands])
        w.close()
    direct, through = answers
    assert not any(b"REFERRAL" in line for line in through), through
    assert through[:5] == direct[:5]
    assert direct[0].startswith(b"s NO Mailbox name is not valid mUTF-7")


def test_utf8_names_are_not_referred_when_enable_utf8_accept_enabled_nothing(proxy_factory, fleet):
    """RFC 5161 3.1 / RFC 6855 3: ENABLE UTF8=ACCEPT to a server that does not announce UTF8=ACCEPT
    (Dovecot 2.3, so neither does the proxy) enables nothing: no ``* ENABLED UTF8=ACCEPT``, and the
    session stays a modified UTF-7 one; Dovecot then refuses a raw UTF-8 name ``NO Mailbox name is
    not valid mUTF-7``. The proxy remembered the names the client asked for, not what was enabled,
    and referred ``"Shared/Caf\\xc3\\xa9"`` to imap://.../Shared/Caf%C3%A9 (while the same UTF-8 name
    of a local mailbox got Dovecot's NO)."""
    proxy = proxy_factory(rules=RULES)
    name = b'"Shared/Caf\xc3\xa9"'
    commands = [(b"s", b"SELECT " + name), (b"t", b"STATUS %s (MESSAGES)" % name), (b"c", b"CREATE " + name),
                (b"b", b"SUBSCRIBE " + name), (b"l", b'SELECT "Caf\xc3\xa9"')]
    answers = []
    for host, port in ((fleet["b3"].host, fleet["b3"].port), (proxy.host, proxy.port)):
        w = Wire(host, port)
        w.login()
        enable = w.cmd(b"e", b"ENABLE UTF8=ACCEPT")
        assert enable[-1].startswith(b"e OK") and not any(line.startswith(b"* ENABLED") for line in enable), enable
        w.cmd(b"r", b'RLIST "" "*"')
        answers.append([_same(w.cmd(tag, command)[-1]) for tag, command in commands])
        w.close()
    direct, through = answers
    assert not any(b"REFERRAL" in line for line in through), through
    assert through == direct
    assert direct[0].startswith(b"s NO Mailbox name is not valid mUTF-7")


def test_copy_naming_a_message_past_the_last_is_bad_not_referred(proxy_factory, fleet):
    """RFC 3501 6.4.7 / 7.1.5: a COPY or MOVE whose sequence set names a message past the last is an
    invalid command: Dovecot answers ``BAD Invalid messageset``, and so does the proxy to a client that
    is not referral-aware (whatever backend holds the destination). To a referral-aware one it said
    ``NO [REFERRAL ...]`` for a remote destination: a client following it meets the BAD on the FETCH
    of the message that is not there. A valid set is still referred."""
    with fleet["b1"].client("alice") as m:
        m.append("INBOX", "", None, b"Subject: one\r\n\r\none\r\n")
    with fleet["b3"].client("alice") as m:
        m.create("Shared/X")
    proxy = proxy_factory(rules=RULES)
    invalid = [b"COPY 2 Shared/X", b"COPY 1:3 Shared/X", b"MOVE 5 Shared/X", b"COPY 1,7 Shared/X"]
    for aware in (False, True):
        w = Wire(proxy.host, proxy.port)
        w.login()
        if aware:
            w.cmd(b"r", b'RLIST "" "*"')
        assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        for command in invalid:
            reply = w.cmd(b"k", command)
            assert reply[-1].startswith(b"k BAD "), (aware, command, reply)
        if aware:
            assert w.cmd(b"v", b"COPY 1 Shared/X")[-1].startswith(b"v NO [REFERRAL imap://alice;AUTH=*@")
        w.close()
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login()
    direct.cmd(b"s", b"SELECT INBOX")
    assert [direct.cmd(b"k", c)[-1][:6] for c in invalid] == [b"k BAD "] * len(invalid)
    direct.close()


@pytest.mark.parametrize("selected_before", [False, True])
def test_copy_pipelined_after_a_failing_select_is_bad_not_referred(proxy_factory, fleet, selected_before):
    """RFC 3501 5.5: a COPY pipelined after a SELECT depends on it; if that SELECT fails, nothing is selected
    (6.3.1) and the COPY is ``BAD No mailbox selected``, as Dovecot answers it (and as the FETCH after it is
    answered through the proxy). A referral-aware session was told ``NO [REFERRAL ...]`` for COPY/MOVE to a
    remote mailbox, BEFORE the SELECT's own NO: the referral was decided while the SELECT was in flight."""
    with fleet["b1"].client("alice") as m:
        m.create("Work")
        m.append("Work", "", None, b"Subject: one\r\n\r\none\r\n")
    with fleet["b3"].client("alice") as m:
        m.create("Shared/X")
    proxy = proxy_factory(rules=RULES)
    commands = [b"SELECT Nope", b"COPY 1 Shared/X", b"UID COPY 1 Shared/X", b"MOVE 1 Shared/X", b"UID MOVE 1 Shared/X",
                b"FETCH 1 FLAGS", b"NOOP"]
    answers = []
    for host, port, dest in ((fleet["b1"].host, fleet["b1"].port, b"Work"), (proxy.host, proxy.port, b"Shared/X")):
        w = Wire(host, port)
        w.login()
        w.send(b'r RLIST "" "*"\r\n')  # aware through the proxy; BAD from Dovecot
        w.until_tagged(b"r")
        if selected_before:
            assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        answers.append([_same(line) for line in w.pipelined([c.replace(b"Shared/X", dest) for c in commands])])
        w.close()
    direct, through = answers
    assert [line.split(b" ", 1)[0] for line in through] == [b"c%d" % i for i in range(len(commands))], through
    assert [line.split(b" ")[:2] for line in through] == [line.split(b" ")[:2] for line in direct], (direct, through)
    assert direct[1].startswith(b"c1 BAD No mailbox selected")


@pytest.mark.parametrize("command", [b'RLIST "" ("*")', b'RLIST "" ("Work" "Shared/*")', b'RLSUB "" ("*")'])
def test_rlist_and_rlsub_take_one_pattern_not_a_list(proxy_factory, fleet, command):
    """RFC 2193 6: ``rlist = "RLIST" SPACE mailbox SPACE list_mailbox`` (RLSUB the same): one pattern. A
    parenthesized list of patterns (LIST-EXTENDED's, RFC 5258, for LIST only) is no RLIST/RLSUB argument:
    BAD (RFC 3501 7.1.5), and the session stays usable. The proxy ran it as a LIST-EXTENDED on every backend."""
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    reply = w.cmd(b"x", command)
    assert reply == [reply[-1]] and reply[-1].startswith(b"x BAD "), reply
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
