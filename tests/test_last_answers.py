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


@pytest.mark.parametrize("round_", range(3))
def test_nothing_is_answered_or_run_after_the_backends_own_bye(proxy_factory, fleet, round_):
    """Probe j6 of stop 59 (12 of 12): the selected Work deleted on b1 by another client; ``n NOOP`` (to b1: Dovecot
    says ``* BYE IMAP session state is inconsistent``), ``f STATUS Far`` and ``a APPEND Far`` pipelined: that BYE was
    relayed at once, then f's answer came after it, and now and then the APPEND ran and was answered after it too
    (3 of 12): a client stopping at the BYE sends it again, twice. Dovecot writes nothing after its BYE. Now the BYE
    comes last, and nothing is read once it came. Judged by the lines and a census of b2."""
    seed(fleet["b1"], "alice", "Work", ["w@bye"])
    seed(fleet["b2"], "alice", "Far", [])
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=30)
    w.login()
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    with fleet["b1"].client("alice") as m:
        assert m.delete("Work")[0] == "OK"
    body = b"Message-Id: <bye-%d@last>\r\nSubject: far\r\n\r\nbody\r\n" % round_
    w.send(b"n NOOP\r\nf STATUS Far (MESSAGES)\r\na APPEND Far {%d+}\r\n%s\r\nz NOOP\r\n" % (len(body), body))
    lines = _rest(w)
    w.close()
    byes = [i for i, line in enumerate(lines) if line.startswith(b"* BYE")]
    assert byes and byes[0] == len(lines) - 1, lines  # one BYE, the last line
    answered = {line.split(b" ", 1)[0] for line in lines if line[:2] in (b"f ", b"a ", b"z ")}
    stored = contents(fleet["b2"], "alice", "Far")
    assert len(stored) == (1 if b"a" in answered else 0), (stored, lines)  # never run unanswered
