"""RLSUB (RFC 2193 5.2: "identical to LSUB", plus the remote mailboxes) brings a subscribed name's
unsubscribed parent as ``\\Noselect`` exactly when Dovecot's LSUB does (RFC 3501 6.3.9): when the
pattern ends with ``%``. The merged listing brought it whenever the pattern held a ``%``: ``RLSUB ""
"%/Sub"`` answered ``* LSUB (\\Noselect) "/" Shared/Sub`` where Dovecot, holding the same names and
subscriptions, answers nothing for it."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
HOME = ["Work", "Work/Sub"]
REMOTE = ["Shared/Projects", "Shared/Sub/Deep"]
SUBSCRIBED = ["Work/Sub", "Shared/Sub/Deep", "INBOX"]
PATTERNS = [("", "%"), ("", "%/%"), ("", "Sh%"), ("", "%/S%"), ("Shared/", "%"), ("", "Shared/S%"),
            ("", "%/Sub"), ("", "S%/Sub"), ("", "Sha%d"), ("", "%d"), ("", "%/%b"), ("Shared/", "%/Deep"),
            ("", "*"), ("", "*/Sub")]


def _names(lines: list[bytes]) -> list[bytes]:
    out = []
    for line in lines:
        m = re.match(rb'\* LSUB (\([^)]*\)) "/" "?(.*?)"?\r\n$', line)
        if m:
            out.append(m.group(1) + b" " + m.group(2))
    return sorted(out)


def test_rlsub_brings_parents_as_dovecots_lsub_does(proxy_factory, fleet):
    with fleet["b1"].client("alice") as m:
        for name in HOME:
            m.create(name)
    with fleet["b3"].client("alice") as m:
        for name in REMOTE:
            m.create(name)
    with fleet["b2"].client("alice") as m:  # b2 holds the same names and subscriptions: the reference
        for name in HOME + REMOTE:
            m.create(name)
        for name in SUBSCRIBED:
            m.subscribe(name)
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    for name in SUBSCRIBED:
        assert w.cmd(b"s", b"SUBSCRIBE " + name.encode())[-1].startswith(b"s OK")
    direct = Wire(fleet["b2"].host, fleet["b2"].port)
    direct.login()
    differ = []
    for reference, pattern in PATTERNS:
        args = b'"%s" "%s"' % (reference.encode(), pattern.encode())
        proxied, expected = _names(w.cmd(b"p", b"RLSUB " + args)), _names(direct.cmd(b"d", b"LSUB " + args))
        if proxied != expected:
            differ.append((reference, pattern, proxied, expected))
    w.close()
    direct.close()
    assert differ == []
