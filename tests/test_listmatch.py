"""LIST/LSUB patterns matched as one server matches them (listmatch.py; the same cases against
real Dovecot: tests/differential/corpus/20-list-patterns-multiappend.imapc)."""

from __future__ import annotations

import pytest

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
