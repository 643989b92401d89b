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
    assert out.endswith(b"* BYE Literal too large to skip (limit 536870912 bytes)\r\n"), out  # (as Dovecot: BYE)
    assert h.to_backend() in (b"", b"rp1 LOGOUT\r\n")


@pytest.mark.parametrize("head", [b"a APPEND INBOX {1+}\r\nx", b'a ID ("k" {1+}\r\nv', b"a SEARCH TEXT {1+}\r\nv", b""])
@pytest.mark.parametrize("size", [HUGE, b"99999999999999999999", b"9" * 40])
def test_a_literal_plus_of_twenty_digits_after_another_literal_is_one_too(head, size):
    """A fragment after a literal is short: `` {99999999999999999999+}`` (24 bytes) fitted the window that
    looks for announcements of 19 digits at most, and the longer look was only made past it. So the
    announcement was text, the command BAD, and the bytes announced as its literal ran as commands
    (found writing the fix for probe g2 of stop 57). Now: refused, and past what any command may
    send, the end (Dovecot: ``* BYE Literal size too large``)."""
    h = SessionHarness()
    h.login()
    h.send(head + b" {%s+}\r\nx CREATE evil\r\ny DELETE INBOX\r\n" % size)
    sent = h.to_backend()
    if b"APPEND" in head:  # the first message went: cancelled there (RFC 3502's empty literal), then answered
        assert sent.endswith(b"x {0+}\r\n\r\n"), sent
        h.from_backend(sent.split(b" ", 1)[0] + b" NO Zero-length literal\r\n")
        h.reactor.advance(0.1)  # (the end looks again for answers owed: lastanswers.py)
        sent += h.to_backend()
    out = h.to_client()
    assert b"\r\nx " not in out and b"\r\ny " not in out and b"invalid atom" not in out, out
    assert out.endswith(b"* BYE Literal too large to skip (limit 536870912 bytes)\r\n") and h.client.disconnecting, out
    assert b"CREATE evil" not in sent and b"DELETE" not in sent, sent


@pytest.mark.parametrize("command", [b"CREATE", b"APPEND INBOX"])
def test_a_synchronizing_literal_of_2_64_bytes_is_refused_before_it_is_sent(command):
    h = SessionHarness()
    h.login()
    h.send(b"a %s {%s}\r\n" % (command, HUGE))
    assert h.to_client().startswith(b"a NO [TOOBIG] ")
    h.send(b"b NOOP\r\n")
    assert h.to_backend() == b"rp1 NOOP\r\n"


# -- a name whose modified UTF-7 stands for CR LF (probe 5, stop 48) ------------------------------------

from referral_proxy.imap import mutf7  # noqa: E402

_FORGING = mutf7.encode("Shared/k\r\nrp6 OK forged")  # Dovecot echoed it decoded: "NO ... k<CR><LF>rp6 OK forged"


@pytest.mark.parametrize("command", [b"SELECT %s", b"EXAMINE %s", b"STATUS %s (MESSAGES)", b"SUBSCRIBE %s",
                                     b"UNSUBSCRIBE %s", b"CREATE %s", b"DELETE %s", b"RENAME %s Other",
                                     b"RENAME Other %s", b"APPEND %s {1+}\r\nx", b"SELECT {%d+}\r\n%s"])
def test_a_name_shifting_a_control_character_is_refused_before_any_backend_sees_it(command):
    h = SessionHarness()
    h.login()
    named = command % ((len(_FORGING), _FORGING) if b"{%d+}" in command else (b'"' + _FORGING + b'"',))
    h.send(b"a " + named + b"\r\nb NOOP\r\n")
    out = h.to_client()
    assert out.startswith(b"a BAD "), out
    assert h.to_backend() == b"rp1 NOOP\r\n"  # (only the NOOP after it)


@pytest.mark.parametrize("name", [_FORGING, b"&AMl-quipe/x"], ids=["line-break", "spare-bits"])
def test_a_copy_into_a_name_a_backend_reads_otherwise_is_refused(name):
    h = SessionHarness()
    h.login()
    h.send(b"s SELECT INBOX\r\n")
    h.from_backend(b"* 1 EXISTS\r\n" + h.to_backend().split(b" ")[0] + b" OK [READ-WRITE] selected\r\n")
    h.to_client()
    for verb in (b"COPY", b"MOVE", b"UID COPY", b"UID MOVE"):
        h.send(b'c %s 1 "%s"\r\n' % (verb, name))
        assert h.to_client().startswith(b"c BAD "), verb
    assert h.to_backend() == b""


def test_shifts_a_line_break_reads_every_run_leniently():
    assert [mutf7.shifts_a_line_break(n) for n in (b"&AA0ACg-", b"&AA0-", b"x&AAo", b"&AGEACg-", _FORGING)] == [True] * 5
    assert not any(mutf7.shifts_a_line_break(n) for n in (b"Caf&AOk-", b"&-", b"R&D", b"&2D3eAA-", b"&", b"&AIU-",
                                                           b"&AAA-", b"&AAk-"))  # (NUL: Dovecot refuses it unechoed)


# -- a name Dovecot reads as another spelling of one mailbox (probe v1, stop 52) ----------------------------

_SPARE = b"&AMl-quipe/x"  # "&AMk-quipe/x" (Équipe/x) with non-zero spare bits: Dovecot 2.3 opens that mailbox


def test_spare_bits_are_found_in_every_shifted_run():
    assert [mutf7.spare_bits_set(n) for n in (_SPARE, b"&ANx-ber", b"a/&AOkA6R-", b"x&AMl-y")] == [True] * 4
    assert not any(mutf7.spare_bits_set(n) for n in (b"&AMk-quipe/x", b"&ANw-ber", b"&AOkA6Q-", b"R&D", b"&-",
                                                     b"&2D3eAA-", b"Caf&AOk-", b"plain", b"x&AMl"))  # (unterminated)


@pytest.mark.parametrize("command", [b"SELECT %s", b"STATUS %s (MESSAGES)", b"CREATE %s", b"DELETE %s",
                                     b"RENAME Work %s", b"RENAME %s Work", b"APPEND %s {1+}\r\nx", b"SUBSCRIBE %s",
                                     b'LIST "" %s', b'LIST %s "*"', b'LIST "" (INBOX %s)', b'LSUB "" %s',
                                     b'RLIST "" %s'])
def test_a_name_with_spare_bits_is_refused_before_any_backend_sees_it(command):
    """Dovecot ignores the spare bits: "&AMl-quipe/x" is its Équipe/x, while the map routed it by its bytes,
    so the rule for "Équipe/*" missed it: STATUS said NO where the mailbox was, a CREATE made a second one
    elsewhere, and a RENAME to it was OK'd and put the mailbox where no client saw it."""
    h = SessionHarness()
    h.login()
    h.send(b"a " + command % (b'"' + _SPARE + b'"',) + b"\r\nb NOOP\r\n")
    out = h.to_client()
    assert out.startswith(b"a BAD "), out
    assert h.to_backend() == b"rp1 NOOP\r\n"  # (only the NOOP after it)
