"""Hostile bytes the framing must read as the client announced them (scripted backend, exact bytes)."""

from __future__ import annotations

import pytest

from referral_proxy.imap.framing import NEED_DATA, Framer, Line, LiteralData
from referral_proxy.testing.fakes import SessionHarness

HUGE = b"18446744073709551616"  # 2**64: twenty digits


@pytest.mark.parametrize("size", [HUGE, b"9" * 40, b"0" * 25 + b"5"])
def test_a_literal_announced_with_twenty_digits_or_more_is_a_literal(size):
    framer = Framer(auto_accept=True)
    framer.receive_data(b"a CREATE {%s+}\r\nabc" % size)
    line = framer.next_event()
    assert isinstance(line, Line) and line.data == b"a CREATE " and line.literal is not None
    assert line.literal.size == int(size) and not line.literal.sync
    assert isinstance(framer.next_event(), LiteralData)
    assert framer.next_event() is NEED_DATA


@pytest.mark.parametrize("command", [b"CREATE", b"APPEND INBOX", b"APPEND INBOX (\\Seen)", b"SELECT"])
def test_what_follows_a_literal_plus_of_2_64_bytes_never_runs_as_a_command(command):
    h = SessionHarness()
    h.login()
    # The old code read "{18446744073709551616+}" as text: "a" got BAD and "x CREATE evil",
    # the first bytes of what the client announced as its literal, ran as a command.
    h.send(b"a %s {%s+}\r\nx CREATE evil\r\ny DELETE INBOX\r\n" % (command, HUGE))
    out = h.to_client()
    assert out.startswith(b"a NO [TOOBIG] "), out
    assert b"\r\nx " not in out and b"\r\ny " not in out, out
    assert h.to_backend() == b""


@pytest.mark.parametrize("command", [b"CREATE", b"APPEND INBOX"])
def test_a_synchronizing_literal_of_2_64_bytes_is_refused_before_it_is_sent(command):
    h = SessionHarness()
    h.login()
    h.send(b"a %s {%s}\r\n" % (command, HUGE))
    assert h.to_client().startswith(b"a NO [TOOBIG] ")
    h.send(b"b NOOP\r\n")
    assert h.to_backend() == b"rp1 NOOP\r\n"
