"""hostile18: a client that half-closes (shutdown(SHUT_WR)) right after a command, after a
literal's announcement, in the middle of a MULTIAPPEND: the proxy closes the connection (no
hang), and the census of the backends is what direct Dovecot's is after the same bytes.
"""

from __future__ import annotations

import socket
import time

import pytest

RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]
M1 = b"Message-Id: <h1@h18>\r\n\r\none\r\n"
M2 = b"Message-Id: <h2@h18>\r\n\r\ntwo\r\n"

CUTS = {
    "after-append": b"a APPEND %(box)s {%(n1)d+}\r\n" + M1 + b"\r\n",
    "after-multiappend": b"a APPEND %(box)s {%(n1)d+}\r\n" + M1 + b" {%(n2)d+}\r\n" + M2 + b"\r\n",
    "after-announcement": b"a APPEND %(box)s {%(n1)d}\r\n",
    "after-announcement-plus": b"a APPEND %(box)s {%(n1)d+}\r\n",
    "mid-literal": b"a APPEND %(box)s {%(n1)d+}\r\n" + M1[:10],
    "mid-multiappend": b"a APPEND %(box)s {%(n1)d+}\r\n" + M1 + b" {%(n2)d+}\r\n" + M2[:5],
    "between-messages": b"a APPEND %(box)s {%(n1)d+}\r\n" + M1,
    "no-crlf-at-end": b"a APPEND %(box)s {%(n1)d+}\r\n" + M1 + b" {%(n2)d+}\r\n" + M2,
}


def _run(host: str, port: int, user: str, data: bytes) -> tuple[bytes, bool]:
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"L LOGIN %s secret\r\n" % user.encode() + data)
    s.shutdown(socket.SHUT_WR)
    out, closed = b"", False
    try:
        while True:
            c = s.recv(65536)
            if not c:
                closed = True
                break
            out += c
    except TimeoutError:
        pass
    s.close()
    return out, closed


def _count(fleet, backend: str, user: str, box: str) -> int:
    with fleet[backend].client(user) as m:
        typ, data = m.select(box, readonly=True)
        return int(data[0]) if typ == "OK" else -1


@pytest.mark.parametrize("box", ["INBOX", "Far"])
def test_half_close_appends_as_dovecot_and_closes(fleet, clean_mail, proxy_factory, box):
    proxy = proxy_factory(rules=RULES)
    with fleet["b1"].client("bob") as m:
        m.create("Far")
    with fleet["b2"].client("carol") as m:
        m.create("Far")
    failures = []
    for name, template in CUTS.items():
        data = template % {b"box": box.encode(), b"n1": len(M1), b"n2": len(M2)}
        before = (_count(fleet, "b1", "bob", box), _count(fleet, "b1" if box == "INBOX" else "b2", "carol", box))
        d_out, d_closed = _run(fleet["b1"].host, fleet["b1"].port, "bob", data)
        p_out, p_closed = _run(proxy.host, proxy.port, "carol", data)
        time.sleep(0.3)
        after = (_count(fleet, "b1", "bob", box), _count(fleet, "b1" if box == "INBOX" else "b2", "carol", box))
        d_added, p_added = after[0] - before[0], after[1] - before[1]
        if not p_closed or d_added != p_added:
            failures.append((name, d_added, p_added, d_closed, p_closed, d_out[-80:], p_out[-80:]))
    assert not failures


# -- whole commands before the half-close are answered (helper probe C, this stop) ------------------

WHOLE = (b"a NOOP\r\nb APPEND %(box)s {%(n1)d+}\r\n" + M1 + b"\r\nc STATUS INBOX (MESSAGES)\r\n"
         b"d SELECT %(box)s\r\ne FETCH 1:* (FLAGS)\r\n")


@pytest.mark.parametrize("box", ["INBOX", "Far"])
def test_whole_commands_sent_before_a_half_close_are_answered_then_the_connection_closes(
        fleet, clean_mail, proxy_factory, box):
    """On 9008653 the end of input closed the session at once: no answer at all, yet the APPEND was
    saved (a client told nothing sends it again). Direct Dovecot answers each, then closes."""
    proxy = proxy_factory(rules=RULES)
    with fleet["b1" if box == "INBOX" else "b2"].client("carol") as m:
        if box != "INBOX":
            m.create(box)
    data = WHOLE % {b"box": box.encode(), b"n1": len(M1)}
    for round_ in range(3):
        before = _count(fleet, "b1" if box == "INBOX" else "b2", "carol", box)
        out, closed = _run(proxy.host, proxy.port, "carol", data)
        tagged = [line.split(b" ", 2)[:2] for line in out.split(b"\r\n") if line[:2] in (b"a ", b"b ", b"c ", b"d ", b"e ")]
        assert tagged == [[t, b"OK"] for t in (b"a", b"b", b"c", b"d", b"e")], (round_, out)
        assert b"* %d EXISTS" % (before + 1) in out and closed, (round_, out)
        assert _count(fleet, "b1" if box == "INBOX" else "b2", "carol", box) == before + 1


CUT_TAILS = {"line": b"c LOGOUT", "literal": b"c CREATE {5+}\r\nab", "announced": b"c CREATE {5}\r\n"}


@pytest.mark.parametrize("tail", sorted(CUT_TAILS))
def test_whole_commands_before_a_cut_last_command_are_answered(fleet, clean_mail, proxy_factory, tail):
    """`printf 'a NOOP\\r\\nb APPEND ...\\r\\nc LOGOUT' | nc -N`: the last command has no CRLF. Direct
    Dovecot answers a and b (the message saved), runs nothing of c, and closes; the proxy closed at
    once: the APPEND saved and never answered (probe 1 of stop 47), a client told nothing sends it again."""
    proxy = proxy_factory(rules=RULES)
    data = b"a NOOP\r\nb APPEND INBOX {%d+}\r\n" % len(M1) + M1 + b"\r\n" + CUT_TAILS[tail]
    for round_ in range(3):
        before = _count(fleet, "b1", "carol", "INBOX")
        out, closed = _run(proxy.host, proxy.port, "carol", data)
        tagged = [line.split(b" ", 2)[:2] for line in out.split(b"\r\n") if line[:2] in (b"a ", b"b ", b"c ")]
        assert tagged == [[b"a", b"OK"], [b"b", b"OK"]] and closed, (round_, out)
        assert _count(fleet, "b1", "carol", "INBOX") == before + 1
    with fleet["b1"].client("carol") as m:
        assert m.list()[1] == [b'(\\HasNoChildren) "/" INBOX']  # nothing of c ran
