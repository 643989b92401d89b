"""ENABLE with a name Dovecot's parser refuses as an atom (hostile round h3).

``a ENABLE CONDSTORE <8-bit>`` (or ``a{b``): direct Dovecot answers ``BAD ... 8bit data in atom``
(``Invalid characters in atom``) and enables nothing. The proxy dropped the unknown name
(commands.enabling: RFC 5161 lets a server ignore names it does not know) and relayed
``ENABLE CONDSTORE``: ``OK``, CONDSTORE enabled by a command the server refuses. Judged beside
direct Dovecot."""

from __future__ import annotations

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("bad", [b"\xff", b"a{b", b"x\x80y"], ids=["8bit", "brace", "8bit-inside"])
def test_enable_with_a_refused_atom_is_bad_as_directly(proxy_factory, fleet, bad):
    proxy = proxy_factory()
    answers = []
    for host, port in ((fleet["b1"].host, fleet["b1"].port), (proxy.host, proxy.port)):
        w = Wire(host, port, timeout=30)
        w.login("alice")
        lines = w.cmd(b"a", b"ENABLE CONDSTORE " + bad)
        answers.append((lines[-1].split(b" ")[1], any(line.startswith(b"* ENABLED") for line in lines)))
        assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
        w.close()
    assert answers[0] == (b"BAD", False), answers
    assert answers[1] == answers[0], answers
