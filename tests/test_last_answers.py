"""A session that ends with its selected backend answers first what its other backends have whole
(lastanswers.py): ``SELECT Work`` ``DELETE Work`` ``APPEND Far`` in one write, Far on b2. Dovecot
says OK to the DELETE, ``* BYE Selected mailbox was deleted`` and closes; the APPEND, relayed to b2
before that BYE came, is stored there. Before, it was answered ``NO [UNAVAILABLE] ... the messages
may or may not be there`` (probe f1 of stop 57): a client that sends it again has it twice.
Judged by a census of b2."""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from mailcheck import contents
from movecheck import seed

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Far*", "backend": "b2"}]


def _rest(w: Wire, seconds: float = 30) -> list[bytes]:
    """Every line until the proxy closes the connection (*seconds* at most: then the lines so far, and a note)."""
    lines: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            lines.append(w.line())
    except ConnectionError:
        return lines
    return lines + [b"(still open after %d s)" % seconds]


@pytest.mark.parametrize("round_", range(3))
def test_an_append_at_another_backend_is_answered_truly_before_the_session_ends(proxy_factory, fleet, round_):
    seed(fleet["b1"], "alice", "Work", ["w@last"])
    seed(fleet["b2"], "alice", "Far", [])
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=30)
    w.login()
    assert w.cmd(b"s", b"STATUS Far (MESSAGES)")[-1].startswith(b"s OK")  # b2's connection there: p3 goes at once
    body = b"Message-Id: <far-%d@last>\r\nSubject: far\r\n\r\n" % round_ + b"x" * 20000 + b"\r\n"
    w.send(b"p1 SELECT Work\r\np2 DELETE Work\r\np3 APPEND Far {%d+}\r\n%s\r\n" % (len(body), body))
    lines = _rest(w)
    w.close()
    tagged = {line.split(b" ", 1)[0]: line for line in lines if line.startswith(b"p")}
    stored = [c for c in contents(fleet["b2"], "alice", "Far")]
    assert tagged.get(b"p2", b"").startswith(b"p2 OK"), lines
    assert any(line.startswith(b"* BYE") for line in lines), lines
    assert tagged.get(b"p3", b"").startswith(b"p3 OK [APPENDUID "), lines  # its true answer
    assert len(stored) == 1, (stored, lines)  # once
