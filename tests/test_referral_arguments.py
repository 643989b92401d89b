"""A referral answers a command the remote server would take, never one it refuses as BAD (referral19).

RFC 2193 lets a server answer a command naming a remote mailbox with ``NO [REFERRAL ...]``; RFC 3501
(7.1.5) reserves BAD for a command that is not valid. On main the proxy judged only the mailbox
argument before it referred: ``STATUS Shared/X ()`` (an empty status list, RFC 3501 ``status``: one
item at least), ``STATUS Shared/X (BOGUS)``, ``COPY 0 Shared/X`` (``seq-number = nz-number / "*"``)
and ``SETACL Shared/X alice lrz`` (RFC 4314 3.1: an unrecognized right MUST give BAD) were referred,
and a client following the URL met a BAD there. Here every such command is BAD through the proxy, as
from the remote Dovecot directly; the valid forms are still referred (RFC 2193 4.1, 4.4); ACL,
METADATA and QUOTA commands, which RFC 2193 does not list, are proxied to the mailbox's backend
(answered there as directly); and nothing moves (census of both backends).
"""

from __future__ import annotations

import re

import pytest
from imapwire import Wire
from mailcheck import contents

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]

#: Commands on a remote mailbox that Dovecot (the remote) answers BAD.
_BAD = [b"STATUS Shared/X ()", b"STATUS Shared/X (BOGUS)", b'STATUS Shared/X ("MESSAGES")',
        b"STATUS Shared/X (MESSAGES (UNSEEN))", b"STATUS Shared/X (MESSAGES BOGUS)", b"STATUS Shared/X (DELETED)",
        b"STATUS Shared/X (APPENDLIMIT)", b"STATUS Shared/X (MAILBOXID)", b"STATUS Shared/X (DELETED-STORAGE)",
        b"STATUS Shared/X (MESSAGES NIL)", b"STATUS Shared/X (UNSEEN 1)",
        b"COPY 0 Shared/X", b"COPY 1:0 Shared/X", b"COPY 0:* Shared/X", b"COPY 1,0 Shared/X", b"UID COPY 0 Shared/X",
        b"MOVE 0 Shared/X", b"UID MOVE 2:0 Shared/X", b"COPY 00 Shared/X", b"COPY 1** Shared/X",
        b"COPY 4294967296 Shared/X", b"UID COPY 1:4294967296 Shared/X",
        b"SETACL Shared/X alice lrz", b"SETMETADATA Shared/X (/private/comment)",
        b'SETMETADATA Shared/X (bogus "x")', b"GETMETADATA Shared/X bogus",
        b"GETMETADATA (MAXSIZE x) Shared/X /private/comment",
        # RFC 7162 3.2.5: QRESYNC before ENABLE QRESYNC MUST be BAD; RFC 4466 parameters the remote does not know
        b"SELECT Shared/X (QRESYNC (1 1))", b"EXAMINE Shared/X (QRESYNC (1 1))", b"SELECT Shared/X (BOGUS)",
        b"SELECT Shared/X (CONDSTORE 1)", b'SELECT Shared/X ("CONDSTORE")', b"EXAMINE Shared/X (CONDSTORE (1))"]

#: Valid forms: still referred (the first group), or proxied as directly (ACL, METADATA, QUOTA).
_REFERRED = [b"STATUS Shared/X (messages)", b"STATUS Shared/X (MESSAGES MESSAGES)", b"STATUS Shared/X (SIZE)",
             b"STATUS Shared/X (HIGHESTMODSEQ)", b"STATUS Shared/X (UNSEEN RECENT UIDNEXT UIDVALIDITY)",
             b"COPY 1 Shared/X", b"COPY 1:* Shared/X", b"COPY *:1 Shared/X", b"UID COPY 4294967295 Shared/X",
             b"UID COPY 10,1:2 Shared/X", b"COPY 01 Shared/X", b"MOVE 1 Shared/X", b"SELECT Shared/X (CONDSTORE)",
             b"EXAMINE Shared/X (condstore)", b"SELECT Shared/X ()"]
_PROXIED = [b"GETACL Shared/X", b"MYRIGHTS Shared/X", b"LISTRIGHTS Shared/X bob", b"SETACL Shared/X bob lr",
            b"DELETEACL Shared/X bob", b"GETQUOTAROOT Shared/X", b'SETMETADATA Shared/X (/private/comment "c")',
            b"GETMETADATA Shared/X /private/comment"]


def _status_word(line: bytes) -> bytes:
    return line.split()[1]


def _answers(host: str, port: int, commands: list[bytes], aware: bool = True, enable: bytes = b"") -> list[bytes]:
    w = Wire(host, port)
    w.login()
    if enable:
        assert w.cmd(b"e", b"ENABLE " + enable)[-1].startswith(b"e OK")
    if aware:
        w.send(b'r RLIST "" "*"\r\n')  # referral-aware through the proxy; BAD from Dovecot, ignored
        w.until_tagged(b"r")
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    out = [re.sub(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"", w.cmd(b"t%d" % i, c)[-1])
           for i, c in enumerate(commands)]
    w.close()
    return out


def _seed(fleet) -> None:
    for backend, box in (("b1", "INBOX"), ("b3", "INBOX")):
        with fleet[backend].client("alice") as m:
            m.append(box, "", None, b"Subject: one\r\n\r\none\r\n")
    with fleet["b3"].client("alice") as m:
        m.create("Shared/X")


def _census(fleet) -> list:
    return [contents(fleet["b1"], "alice", "INBOX"), contents(fleet["b3"], "alice", "Shared/X")]


@pytest.mark.parametrize("command", _BAD)
def test_a_command_the_remote_answers_bad_is_bad_through_the_proxy_never_referred(proxy_factory, fleet, command):
    _seed(fleet)
    before = _census(fleet)
    proxy = proxy_factory(rules=RULES)
    direct = _answers(fleet["b3"].host, fleet["b3"].port, [command])[0]
    assert _status_word(direct) == b"BAD", direct  # what the client following a referral would meet
    through = _answers(proxy.host, proxy.port, [command])[0]
    assert b"REFERRAL" not in through and _status_word(through) == b"BAD", (command, through)
    assert _census(fleet) == before


def test_a_bad_select_leaves_the_selected_mailbox_selected_and_qresync_after_enable_is_referred(proxy_factory, fleet):
    """A SELECT that is BAD unselects nothing (Dovecot parses before it closes); after ENABLE QRESYNC
    the QRESYNC parameter is referred, malformed ones are BAD."""
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    plain = _answers(proxy.host, proxy.port, [b"SELECT Shared/X (QRESYNC (1 1))", b"FETCH 1 (FLAGS)"])
    assert plain[0].startswith(b"t0 BAD") and plain[1].startswith(b"t1 OK"), plain  # INBOX still selected
    bad = [b"SELECT Shared/X (QRESYNC)", b"SELECT Shared/X (QRESYNC ())", b"SELECT Shared/X (QRESYNC (1 x))",
           b"SELECT Shared/X (QRESYNC (1 1 1:*))"]
    direct = _answers(fleet["b3"].host, fleet["b3"].port, bad, enable=b"QRESYNC")
    assert [_status_word(line) for line in direct] == [b"BAD"] * 4, direct
    good = [b"SELECT Shared/X (QRESYNC (1 1))", b"SELECT Shared/X (QRESYNC (1 1 1:2 (1:2 1:2)))"]
    through = _answers(proxy.host, proxy.port, [*bad, b"FETCH 1 (FLAGS)", *good], enable=b"QRESYNC")
    assert [_status_word(line) for line in through[:5]] == [b"BAD", b"BAD", b"BAD", b"BAD", b"OK"], through
    url = b"REFERRAL imap://alice;AUTH=*@%s:%d/Shared/X" % (fleet["b3"].host.encode(), fleet["b3"].port)
    assert url in through[5] and url in through[6], through


def test_the_valid_forms_are_referred_or_proxied_as_directly(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    through = _answers(proxy.host, proxy.port, _REFERRED)
    for command, line in zip(_REFERRED, through):
        assert re.fullmatch(rb"t\d+ NO \[REFERRAL imap://alice;AUTH=\*@%s:%d/Shared/X\] Remote mailbox\r\n"
                            % (re.escape(fleet["b3"].host.encode()), fleet["b3"].port), line), (command, line)
    with fleet["b1"].client("alice") as m:
        m.create("Shared/X")  # a stray copy on b1: a proxied command must reach b3's
    direct = _answers(fleet["b3"].host, fleet["b3"].port, _PROXIED)
    for aware in (True, False):
        through = _answers(proxy.host, proxy.port, _PROXIED, aware=aware)
        assert through == direct, (aware, through, direct)
    assert contents(fleet["b1"], "alice", "INBOX") and not contents(fleet["b3"], "alice", "Shared/X")
