"""A LIST-EXTENDED command's literals went to the backends as LITERAL+ (hostile round h3).

listing._filtered wrote the re-encoded command with every literal announced ``{n+}``. A client
that sends ``a LIST (SUBSCRIBED) "" (INBOX) RETURN (CHILDREN <8-bit atom> {n}`` and waits for
the ``+`` as it should: direct Dovecot refuses the line (``BAD ... 8bit data in atom``), never
says ``+``, and the literal is never sent. The proxy said ``+`` itself and wrote the literal
non-synchronizing after a line Dovecot refused: Dovecot ran the literal's lines as commands
(``x9 CREATE Injected`` made the mailbox on b1). The same with 20 patterns sent as 2040-byte
literals of ``"``: each became a 4082-byte quoted string, the line passed Dovecot's 64 KiB
(``IMAP command line too large``), and the following literal ran as commands.
Judged on the backends, beside direct Dovecot."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

INJECTED = b"\r\nx9 CREATE Injected\r\n"
_SYNC = re.compile(rb"\{(\d+)\}\r\n")


def _send(w: Wire, data: bytes) -> bytes:
    """*data* as a careful client sends it: after each synchronizing literal's announcement,
    the rest only once the server says ``+``. The tagged answer of ``a``."""
    pos = 0
    for m in _SYNC.finditer(data):
        w.send(data[pos:m.end()])
        pos = m.end()
        line = w.line()
        if not line.startswith(b"+"):
            return line if line.startswith(b"a ") else w.until_tagged(b"a")[-1]
    w.send(data[pos:])
    return w.until_tagged(b"a")[-1]


def _injected(fleet) -> list[str]:
    out = []
    for backend in fleet.backends.values():
        with backend.client("alice") as m:
            for line in m.list()[1]:
                if line and b"Injected" in line:
                    out.append(backend.name)
                    m.delete(line.rsplit(b" ", 1)[-1].strip(b'"').decode())
    return out


_PATTERNS = b"".join(b"{2040}\r\n" + b'"' * 2040 + b" " for _ in range(20))
LINES = {
    "8bit-atom": b'a LIST (SUBSCRIBED) "" (INBOX) RETURN (CHILDREN \xff {%d}\r\n' % len(INJECTED) + INJECTED + b")\r\n",
    "brace-atom": b'a LIST (SUBSCRIBED) "" (INBOX) RETURN (CHI{LDREN {%d}\r\n' % len(INJECTED) + INJECTED + b")\r\n",
    "long-patterns": b'a LIST (SUBSCRIBED) "" (' + _PATTERNS + b"INBOX) RETURN (CHILDREN {%d}\r\n" % len(INJECTED)
    + INJECTED + b")\r\n",
}


@pytest.mark.parametrize("case", sorted(LINES))
def test_list_extended_literal_never_runs_as_commands(proxy_factory, fleet, case):
    proxy = proxy_factory()
    for host, port in ((fleet["b1"].host, fleet["b1"].port), (proxy.host, proxy.port)):
        w = Wire(host, port, timeout=30)
        w.login("alice")
        answer = _send(w, LINES[case])
        assert answer.startswith(b"a BAD"), (host, answer)
        assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
        w.close()
        assert _injected(fleet) == [], (host, answer)
