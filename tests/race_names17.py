"""Round 17 (attack17, not collected): odd names through a RENAME across, beside direct Dovecot.

Each name: CREATE, APPEND, RENAME to "Far"+name (b2: across; directly on b1: "Nea"+name), LIST, SUBSCRIBE,
LSUB, STATUS, RENAME back across, STATUS, DELETE, LSUB; every tagged status must be Dovecot's (its text
aside), and the listings the same names. Held (``python3 -m pytest tests/race_names17.py -s``): quote,
backslash, %, *, mUTF-7, trailing separators, inbox/x in three cases, a near miss of the private prefix,
space, ], {, raw 8-bit in a literal. The one difference: ``Referral-Proxy-Aside-x`` (any case of the
proxy's private prefixes) is refused NO [CANNOT] and hidden, where Dovecot makes it (not in the README's
differences table yet)."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire
from movecheck import census

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]


def _lit(name: bytes) -> bytes:
    return b"{%d+}\r\n%s" % (len(name), name)


def _q(name: bytes) -> bytes:
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


NAMES = [b'a"b', b"a\\b", b"a%b", b"a*b", b"caf&AOk-", b"A/", b"x/y/", b"inbox/x", b"Inbox/x", b"INBOX/x",
         b"referral-proxy-asidex", b"Referral-Proxy-Aside-x", b"a b", b"a]b", b"a{b", b"\xc3\xa9t\xc3\xa9"]


def _script(name: bytes, far: bytes) -> list[bytes]:
    m = b"Message-Id: <m@t>\r\nSubject: x\r\n\r\nhello\r\n"
    enc = _lit if any(c > 127 for c in name) else _q
    return [b"CREATE " + enc(name), b"APPEND " + enc(name) + b" {%d+}\r\n%s" % (len(m), m),
            b"RENAME " + enc(name) + b" " + enc(far), b"LIST \"\" *", b"SUBSCRIBE " + enc(far), b"LSUB \"\" *",
            b"STATUS " + enc(far) + b" (MESSAGES)", b"RENAME " + enc(far) + b" " + enc(name + b"2"),
            b"STATUS " + enc(name + b"2") + b" (MESSAGES)", b"DELETE " + enc(name + b"2"), b"LSUB \"\" *"]


def _run(w: Wire, cmds: list[bytes]) -> list[list[bytes]]:
    out = []
    for i, c in enumerate(cmds):
        lines = w.cmd(b"t%d" % i, c)
        out.append([re.sub(rb" \(\d+\.\d+ \+ .*?secs\)\.", b"", re.sub(rb"\[\d{4}-\d\d-\d\d [\d:]+\]", b"", x)).strip()
                    for x in lines])
    return out


@pytest.mark.parametrize("name", NAMES, ids=[n.decode("latin-1") for n in NAMES])
def test_odd_name_across(proxy_factory, fleet, name):
    d = Wire(fleet["b1"].host, fleet["b1"].port)
    d.login("carol")
    direct = _run(d, _script(name, b"Nea" + name))
    fleet.reset_mail()
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login("carol")
    via = _run(w, _script(name, b"Far" + name))
    _counts, where = census(fleet, "carol")
    assert not where, where  # the one message was deleted with its mailbox, on both sides
    print("NAME", name)
    for a, b in zip(direct, via):
        ta, tb = a[-1].split(b" ")[1:3], b[-1].split(b" ")[1:3]
        flag = "  " if ta[0] == tb[0] else "!!"
        print(flag, a[-1][:90], "|", b[-1][:110])
        if a[0].startswith(b"* L") or b[0].startswith(b"* L"):
            print("      ", [x for x in a if x.startswith(b"* ")], "|", [x for x in b if x.startswith(b"* ")])
    if name.lower().startswith(b"referral-proxy-aside-"):
        return  # refused by the proxy (its private prefix, in any case)
    assert [a[-1].split(b" ")[1:2] for a in direct] == [b[-1].split(b" ")[1:2] for b in via]
    for a, b in zip(direct, via):
        if a[0].startswith(b"* L"):
            assert sorted(x.split(b'"/" ')[1].strip(b'"').replace(b"Nea", b"Far") for x in a if x.startswith(b"* ")) == \
                sorted(x.split(b'"/" ')[1].strip(b'"') for x in b if x.startswith(b"* ")), (a, b)
