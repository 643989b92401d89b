"""LIST, LSUB and STATUS from the bytes (fastnames.py) answer as the long way does, on real Dovecot.

A command read alone, as one plain line, takes the fast path (a user on one backend, no move on);
the same command followed by a NOOP in one write takes the long way (the reader, listing's merge,
mailboxes.by_mailbox). Both answers must be the same bytes: private names (staging, asides and
their children) hidden, \\Noselect placeholders, child flags, wildcard, quoted and 8-bit names,
INBOX's children in any case, LSUB's parents, referrals of a referral-aware session."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire
from test_fastpath import harness

pytestmark = pytest.mark.usefixtures("clean_mail")

# Made directly on b1 (the proxy refuses the private ones); "Ghost" and "Deep/er" only as parents.
MAILBOXES = [b"Work", b"Work/Archive", b"Work/referral-proxy-aside-in", b"50% off", b"a*b", b'q"uote',
             b"back\\slash", b"Caf&AOk-", b"Caf&AOk-/Sub", b"INBOX/Kid", b"inbox/lower", b"Ghost/Child",
             b"Deep/er/est", b"referral-proxy-staging-0123abcd", b"referral-proxy-aside-77",
             b"referral-proxy-aside-77/child", b"Only/referral-proxy-aside-x"]
SUBSCRIBED = [b"Work", b"Work/Archive", b"50% off", b"Caf&AOk-/Sub", b"INBOX/Kid", b"Gone", b"Ghost/Child",
              b"Deep/er/est", b"referral-proxy-aside-77", b"referral-proxy-staging-0123abcd/x", b"q\"uote"]
PATTERNS = [(b'""', b"*"), (b'""', b"%"), (b'""', b'"*"'), (b'""', b"INBOX"), (b'""', b"inbox*"), (b'""', b"In%"),
            (b'""', b"i*"), (b'""', b"%/%"), (b'""', b'"50% off"'), (b'""', b'"q\\"uote"'), (b'""', b'"back\\\\slash"'),
            (b'""', b"*ref*"), (b'""', b"*aside*"), (b'""', b"referral-proxy-*"), (b'""', b"Caf*"), (b'""', b"*&AOk-*"),
            (b'""', b"Ghost"), (b'""', b"Ghost/%"), (b'""', b"Deep/%"), (b'""', b"Deep/%/%"), (b"Work/", b"%"),
            (b'"INBOX/"', b"%"), (b'""', b"inbox/%"), (b'""', b"Work/*"), (b'""', b"a*b"), (b'""', b"Nothing*"),
            (b"Work", b'"/*"'), (b'""', b"%a%"), (b'""', b"*/"), (b'""', b"Only/%"),
            (b'""', b"Shared*"), (b'""', b"Caf&AOl-*"), (b"Caf&AOl-", b"%")]  # (spare bits: BAD, both ways)
STATUS_OF = [b"INBOX", b"inbox", b"Work", b'"Work/Archive"', b'"50% off"', b'"q\\"uote"', b'"back\\\\slash"',
             b"Caf&AOk-", b"inbox/lower", b"INBOX/Kid", b"Ghost", b"Nothing", b"referral-proxy-aside-77",
             b"referral-proxy-staging-0123abcd", b"Work/referral-proxy-aside-in", b'""', b"Shared/Docs", b"Caf&AOl-"]


_TIMES = re.compile(rb" \([0-9.+ ]+ secs\)")  # Dovecot's timings in a completion


def _both_ways(w: Wire, tag: bytes, text: bytes) -> tuple[list[bytes], list[bytes]]:
    """The answer to *text* read alone (the fast path), then sent with a NOOP after it (the long way)."""
    fast = w.cmd(tag, text)
    w.send(tag + b" " + text + b"\r\nz NOOP\r\n")
    slow = w.until_tagged(tag)
    assert w.until_tagged(b"z")[-1].startswith(b"z OK")
    return [_TIMES.sub(b"", line) for line in fast], [_TIMES.sub(b"", line) for line in slow]


def _seed(fleet) -> None:
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login()
    for i, name in enumerate(MAILBOXES):
        quoted = b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        assert direct.cmd(b"c%d" % i, b"CREATE " + quoted)[-1].startswith(b"c%d OK" % i), name
    assert direct.cmd(b"d", b'DELETE "Ghost/Child"')[-1].startswith(b"d OK")  # Ghost: a parent only
    assert direct.cmd(b"c", b'CREATE "Ghost/Child"')[-1].startswith(b"c OK")
    for i, name in enumerate(SUBSCRIBED):
        quoted = b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        gone = name not in MAILBOXES  # subscribed, then deleted: the subscription stays
        assert not gone or direct.cmd(b"g%d" % i, b"CREATE " + quoted)[-1].startswith(b"g%d OK" % i), name
        assert direct.cmd(b"s%d" % i, b"SUBSCRIBE " + quoted)[-1].startswith(b"s%d OK" % i), name
        assert not gone or direct.cmd(b"x%d" % i, b"DELETE " + quoted)[-1].startswith(b"x%d OK" % i), name
    direct.close()


@pytest.mark.parametrize("aware, split", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["transparent", "referral-aware", "two-backends", "two-backends-referral-aware"])
def test_list_lsub_status_answer_as_the_long_way(proxy_factory, fleet, aware, split):
    """*split*: Shared/* on b3 (the fast path must leave LIST to the merge over both backends)."""
    _seed(fleet)
    if split:
        b3 = Wire(fleet["b3"].host, fleet["b3"].port)
        b3.login()
        for i, name in enumerate((b"Shared", b"Shared/Docs", b"Work")):  # b3's Work: a stray copy, hidden
            assert b3.cmd(b"c%d" % i, b"CREATE " + name)[-1].startswith(b"c%d OK" % i)
            assert b3.cmd(b"s%d" % i, b"SUBSCRIBE " + name)[-1].startswith(b"s%d OK" % i)
        b3.close()
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}] if split else ())
    w = Wire(proxy.host, proxy.port)
    w.login()
    listed = w.cmd(b"l", b'LIST "" *')  # (split: the session's connection to b3 opened)
    if aware:  # RLIST makes the session referral-aware: its LIST asks its home backend only
        assert w.cmd(b"r", b'RLIST "" ""')[-1].startswith(b"r OK")
    assert not any(b"referral-proxy-staging" in line or b'"/" referral-proxy-aside' in line for line in listed)
    assert any(b"Only/referral-proxy-aside-x" in line for line in listed)  # not a private name: shown
    assert any(line.startswith(b"* LIST (\\Noselect \\HasChildren)") for line in listed), listed
    for command in (b"LIST", b"LSUB"):
        for i, (reference, pattern) in enumerate(PATTERNS):
            tag = b"%s%d" % (command, i)
            fast, slow = _both_ways(w, tag, command + b" " + reference + b" " + pattern)
            assert fast == slow, (command, reference, pattern)
    for i, name in enumerate(STATUS_OF):
        tag = b"S%d" % i
        fast, slow = _both_ways(w, tag, b"STATUS " + name + b" (MESSAGES UNSEEN RECENT UIDNEXT UIDVALIDITY)")
        assert fast == slow, name
    w.close()


def test_a_list_read_alone_takes_the_fast_path():
    """The differential test above compares two paths only if the fast one is taken: here the reader
    never sees a LIST, LSUB or STATUS read alone, and the backend is asked what listing asks."""
    h, seen = harness()  # seen: the reads that went the long way (through the reader)
    h.send(b'a LIST "" *\r\n')
    assert h.to_backend() == b'rp1 LIST "" "*"\r\n'
    h.from_backend(b'* LIST (\\HasNoChildren) "/" INBOX\r\n* LIST (\\HasNoChildren) "/" referral-proxy-aside-1\r\n'
                   b'* LIST (\\HasNoChildren) "/" A/B\r\nrp1 OK done\r\n')
    assert h.to_client() == (b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n* LIST (\\Noselect \\HasChildren) "/" "A"\r\n'
                             b'* LIST (\\HasNoChildren) "/" "A/B"\r\na OK LIST completed.\r\n')
    h.send(b'b STATUS "INBOX" (MESSAGES)\r\n')
    assert h.to_backend() == b"rp2 STATUS INBOX (MESSAGES)\r\n"
    h.from_backend(b"* STATUS INBOX (MESSAGES 2)\r\nrp2 OK done\r\n")
    assert h.to_client() == b"* STATUS INBOX (MESSAGES 2)\r\nb OK done\r\n"
    assert seen == []
