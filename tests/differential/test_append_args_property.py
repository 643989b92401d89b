"""APPEND's flags and date, as hypothesis writes them, to direct Dovecot and through the proxy.

The proxy checks an APPEND's flags and date itself before it says ``+`` or takes a LITERAL+
literal (reader.py), so that a command the backend would refuse before its literal never makes
the backend read the literal's lines as commands. What it lets through must therefore be what
Dovecot's parser takes; and for transparency it should refuse no more, and with the same status.
Each example is one APPEND whose LITERAL+ literal is a command line of its own (``Z NOOP``):
Dovecot runs it when it refuses the APPEND first; through the proxy it must never run."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

_DAY = st.sampled_from(["1", " 1", "01", "31", "0", " 0", "00", "32", "001", "  1", "x1"])
_MONTH = st.sampled_from(["Jan", "jan", "DEC", "Foo", "Janu"])
_YEAR = st.sampled_from(["2020", "1900", "0000", "20", "99999"])
_TIME = st.sampled_from(["00:00:00", "23:59:59", "24:00:00", "23:59:60", "0:00:00", "00:60:00", "00:00"])
_ZONE = st.sampled_from(["+0000", "-1200", "+1260", "+2400", "0000", "+00000", "+000", "UT", ""])
_DATE = st.builds(lambda d, m, y, t, sp, z, tail: f"{d}-{m}-{y}{sp}{t} {z}{tail}",
                  _DAY, _MONTH, _YEAR, _TIME, st.sampled_from([" ", "  "]), _ZONE, st.sampled_from(["", " "]))
_FLAG = st.sampled_from(["\\Seen", "\\seen", "\\Draft", "\\Recent", "\\*", "\\Foo", "\\", "$Label", "a]b", "a%b",
                         "a*b", "a\\b", "a{b", "a[b", "a}b", "NIL", "~x", "(x)", '"x"'])
_FLAGS = st.lists(_FLAG, max_size=3).map(lambda fs: "(" + " ".join(fs) + ")")


def _status(lines: list[bytes], tag: bytes) -> bytes:
    return next(line.split()[1] for line in lines if line.startswith(tag + b" "))


@pytest.fixture
def append_both(proxy_factory, fleet):
    """``append(head) -> (Dovecot's status, the proxy's)`` of ``APPEND INBOX head {n+}`` on
    direct b2 and through a proxy in front of b1 (two sessions kept for all examples)."""
    proxy = proxy_factory()
    direct, proxied = Wire(fleet["b2"].host, fleet["b2"].port), Wire(proxy.host, proxy.port)
    for w in (direct, proxied):
        w.login("carol", "secret")
    numbers = itertools.count()

    def append(head: str) -> tuple[bytes, bytes]:
        n = next(numbers)
        body = b"Z%d NOOP\r\n" % n
        command = b"A%d APPEND INBOX %s {%d+}\r\n%s\r\nP%d NOOP\r\n" % (n, head.encode(), len(body), body, n)
        seen = []
        for w in (direct, proxied):
            w.send(command)
            seen.append(w.until_tagged(b"P%d" % n))
        assert not any(line.startswith(b"Z%d " % n) for line in seen[1]), (head, seen[1])  # never a command
        return _status(seen[0], b"A%d" % n), _status(seen[1], b"A%d" % n)

    yield append
    direct.close()
    proxied.close()


_EXAMPLES = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))


def test_append_flags_answered_as_dovecot_answers(append_both):
    """Same status for every flag list: BAD where Dovecot's parser refuses it, NO [CANNOT] where it
    reads an atom that is no keyword (before: BAD), OK otherwise. One known difference, both refusals:
    a `[` and a later `]` with a space between (`(a[b a]b)`): Dovecot reads them as one atom, as in
    ``BODY[HEADER.FIELDS (A B)]``, and says NO; the proxy reads RFC 3501's two atoms, the second with
    a `]` no atom may hold, and says BAD (hypothesis found it, round 18)."""
    @_EXAMPLES
    @given(_FLAGS)
    def check(flags: str) -> None:
        dovecot, through = append_both(flags)
        bracketed = "[" in flags and "]" in flags[flags.index("["):]
        assert through == dovecot or (bracketed and (dovecot, through) == (b"NO", b"BAD")), (flags, dovecot, through)
    check()


def test_append_date_answered_as_dovecot_answers_or_refused_outside_rfc_3501(append_both):
    """A date Dovecot refuses is refused; one the proxy takes gets Dovecot's answer. The proxy may
    refuse a date Dovecot tolerates outside RFC 3501's grammar (a zone without its sign, bytes after
    it, minute 60): it relays only dates every RFC 3501 server reads, since a backend that refused
    one would read a LITERAL+ message as commands."""
    @_EXAMPLES
    @given(_DATE)
    def check(date: str) -> None:
        dovecot, through = append_both(f'(\\Seen) "{date}"')
        assert through == dovecot or (through, dovecot) == (b"BAD", b"OK"), (date, dovecot, through)
    check()
