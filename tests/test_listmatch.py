"""LIST/LSUB patterns matched as one server matches them (listmatch.py; the same cases against
real Dovecot: tests/differential/corpus/20-list-patterns-multiappend.imapc)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_proxy.listing import ListEntry, select
from referral_proxy.listmatch import list_matcher

NAMES = [b"INBOX", b"INBOX/kid", b"Caf&AOk-", b"Work/Archive", b"Items", b"inboxes", b"a*b", b"50%"]


@pytest.mark.parametrize("pattern, expected", [
    # INBOX's letters in any case where the pattern may stand for INBOX (main: only "INBOX*")
    (b"inbox*", [b"INBOX", b"INBOX/kid", b"inboxes"]),
    (b"i*", [b"INBOX", b"INBOX/kid", b"inboxes"]),
    (b"*box", [b"INBOX"]),
    (b"In%", [b"INBOX"]),
    (b"I%B%X", [b"INBOX"]),
    (b"inbox/%", [b"INBOX/kid"]),
    (b"*x", [b"INBOX"]),
    (b"It*", [b"Items"]),  # no other name matches without case
    # characters, not modified UTF-7 (main: "*A*" found Caf&AOk-, "Café" in UTF-8 nothing)
    (b"*A*", [b"Work/Archive"]),
    (b"Caf&AO%", []),
    (b"Caf%", [b"Caf&AOk-"]),
    (b"Caf\xc3\xa9", [b"Caf&AOk-"]),
    (b"Caf\xe9*", []),
    (b"%&AOk-", [b"Caf&AOk-"]),
    # wildcards in names are data; runs of wildcards are one
    (b"a*b", [b"a*b"]),
    (b"5%%", [b"50%"]),
    (b"%*%", NAMES),
])
def test_patterns_match_as_dovecot(pattern, expected):
    matches = list_matcher(pattern, "/")
    assert [n for n in NAMES if matches(n)] == expected


def test_a_long_name_under_inbox_is_matched():
    name = b"INBOX/" + b"x/" * 3000 + b"end"
    assert list_matcher(b"i" + b"*%" * 200 + b"end", "/")(name)
    assert not list_matcher(b"i" + b"*%" * 200 + b"nope", "/")(name)


def _lsub(names: list[bytes], pattern: bytes) -> list[tuple[tuple[bytes, ...], bytes]]:
    entries = [ListEntry((), b"/", n, "b1") for n in names]
    return [(e.flags, e.name) for e in select(entries, b"", pattern, "/", lsub_parents=b"%" in pattern)]


def test_lsub_percent_shows_the_nearest_parent_that_matches_only_for_a_name_that_does_not():
    subscribed = [b"Shared/Projects/2026", b"Work"]
    assert _lsub(subscribed, b"%") == [((b"\\Noselect",), b"Shared"), ((), b"Work")]
    assert _lsub(subscribed, b"Shared/%") == [((b"\\Noselect",), b"Shared/Projects")]
    assert _lsub(subscribed, b"Sh*%") == [((), b"Shared/Projects/2026")]  # main: Shared, Shared/Projects too
    assert _lsub(subscribed, b"*/%") == [((), b"Shared/Projects/2026")]  # main: Shared/Projects too
    assert _lsub(subscribed + [b"Shared"], b"%") == [((), b"Shared"), ((), b"Work")]


def test_many_wildcards_never_backtrack():
    """A pattern Python's re would take minutes over (".*a" twelve times, forty "a"s)."""
    pattern = b"*a" * 16 + b"*b"
    name = b"a" * 40
    assert not list_matcher(pattern, "/")(name)
    assert list_matcher(pattern, "/")(name + b"b")
    assert not list_matcher(b"%a" * 16 + b"%b", "/")(name)
    assert list_matcher(b"%a" * 16 + b"%b", "/")(name + b"b")
    assert not list_matcher(b"%a" * 16 + b"%b", "/")(b"a" * 20 + b"/" + b"a" * 20 + b"b")


def test_the_automaton_and_the_regex_agree():
    import itertools

    from referral_proxy.listmatch import _Automaton, _compress, _regex
    alphabet = ["a", "/", "*", "%", "I", "n"]
    names = ["".join(p) for n in range(5) for p in itertools.product("aI/n", repeat=n)]
    for n in range(5):
        for chars in itertools.product(alphabet, repeat=n):
            pattern = _compress("".join(chars))
            automaton, regex = _Automaton(pattern, "/"), _regex(pattern, "/")
            for name in names:
                assert automaton.matches(name, False) == (regex.fullmatch(name) is not None), (pattern, name)


# -- the map's rules (routing.pattern_matches): client-chosen names, never a backtracking regex ------


class _Counted(str):
    """A mailbox name that counts the characters a matcher reads from it (a regex reads none
    this way: it runs in C, and backtracks)."""

    def __new__(cls, text: str) -> _Counted:
        out = super().__new__(cls, text)
        out.read = 0
        return out

    def __iter__(self):
        for c in str.__iter__(self):
            self.read += 1
            yield c


def test_a_map_rule_is_matched_reading_each_character_of_the_name_once():
    """``*a*a*a*a*a*a*a*b`` against forty "a"s took 1.8 s with main's regex (polynomial in the
    name, of degree the wildcards: a dozen of them and a 200-character name, which any client may
    CREATE, stop every session of the process for good). Matched by the automaton, each character
    is read once: 200 steps for 200 characters, whatever the pattern."""
    from referral_proxy.routing import pattern_matches

    small = _Counted("a" * 30)
    assert not pattern_matches("*a*a*a*b", small) and small.read == 30
    for pattern in ("*a" * 12 + "*b", "%a" * 12 + "%b", "Shared/*a*%a%*a*/*b", "*" * 50 + "b"):
        name = _Counted("a" * 200)
        assert not pattern_matches(pattern, name)
        assert name.read <= 200, (pattern, name.read)
    assert pattern_matches("*a" * 12 + "*b", "a" * 200 + "b") and pattern_matches("INBOX/%", "inbox/x")
    assert not pattern_matches("INBOX/%", "inbox/x/y") and pattern_matches("Shared/*", "Shared/x/y")


_WILD = st.text(alphabet="ab/*%", max_size=8)


@settings(max_examples=400, deadline=None)
@given(_WILD, st.text(alphabet="ab/", max_size=8))
def test_map_rules_match_as_the_regex_did(pattern, name):
    """The automaton agrees with the regex it replaced (``*``: ``.*``, ``%``: ``[^/]*``) on small cases."""
    from referral_proxy.routing import pattern_matches

    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    assert pattern_matches(pattern, name) == (re.fullmatch(regex, name, re.DOTALL) is not None)
