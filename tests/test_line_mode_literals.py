"""The line that ends IDLE and a SASL response are text to a server (RFC 2177, RFC 3501 6.2.2): one ending in
``{16+}`` is a bad DONE or bad base64, and the commands after it are read and answered. The proxy took the
announcement for a literal and swallowed the next bytes: those commands were never answered, and with
``{99999999+}`` the client waited for good (probe t2 of stop 51). Judged against direct Dovecot."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire

CASES = {
    "idle-done": (True, [b"a SELECT INBOX\r\nb IDLE\r\n", b"DONE {16+}\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"]),
    "idle-literal8": (True, [b"a SELECT INBOX\r\nb IDLE\r\n", b"X ~{8+}\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"]),
    "idle-huge": (True, [b"a SELECT INBOX\r\nb IDLE\r\n", b"X {99999999+}\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"]),
    "idle-nul": (True, [b"a SELECT INBOX\r\nb IDLE\r\n", b"DONE\0{5+}\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"]),
    "idle-too-long": (True, [b"a SELECT INBOX\r\nb IDLE\r\n", b"X" * 70000 + b" {20+}\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"]),
    "sasl": (False, [b"b AUTHENTICATE PLAIN\r\n", b"abc {16+}\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"]),
}


def _answered(host: str, port: int, login: bool, writes: list[bytes]) -> list[str]:
    """The tags answered, in order, and their status words."""
    w = Wire(host, port, timeout=10)
    if login:
        w.login()
    lines = []
    for data in writes[:-1]:
        w.send(data)
        while not (line := w.line()).startswith(b"+"):  # IDLE's or AUTHENTICATE's continuation
            lines.append(line)
    w.send(writes[-1])
    try:
        while not lines or not lines[-1].startswith(b"e "):
            lines.append(w.line())
    except TimeoutError:
        pass  # what was answered is compared
    w.close()
    return [m.group(1).decode() + " " + m.group(2).decode()
            for line in lines if (m := re.match(rb"([b-e]) (OK|NO|BAD)", line))]


@pytest.mark.parametrize("case", CASES)
def test_a_line_read_as_text_ending_in_a_literal_announcement_is_text(fleet, proxy_factory, case):
    login, writes = CASES[case]
    proxy = proxy_factory({"proxy": {"login_penalty": 0}})
    direct = _answered(fleet["b1"].host, fleet["b1"].port, login, writes)
    assert [t.split()[0] for t in direct] == ["b", "c", "d", "e"], direct  # Dovecot, as the RFCs read it
    through = _answered(proxy.host, proxy.port, login, writes)
    assert [t.split()[0] for t in through] == ["b", "c", "d", "e"], through
    assert through[1:] == direct[1:], (direct, through)
    assert through[0] == direct[0] if case == "idle-nul" else through[0].split()[1] in ("BAD", "NO"), (direct, through)
