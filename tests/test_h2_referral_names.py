"""Hostile names and RFC 2193 referrals (h2): what a referral-aware session is told about names a
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
