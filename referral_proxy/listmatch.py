"""LIST/LSUB patterns matched as one IMAP server (Dovecot) matches them against its names.

The proxy merges its backends' mailboxes and applies the client's reference and pattern
itself (listing.py), so it must match exactly as a single server would:

* **Unicode, not modified UTF-7.** A pattern and a name are compared as the characters
  they stand for: each is decoded from modified UTF-7 when it is valid modified UTF-7,
  else taken as sent (UTF-8). ``*A*`` does not match ``Caf&AOk-`` (its "A" is base64, the
  name is "Café"), ``Caf&AO%`` matches nothing, and ``Café`` sent in UTF-8 finds
  ``Caf&AOk-`` as Dovecot finds it.
* **INBOX in any case** (RFC 3501 5.1). When the pattern may stand for INBOX (it begins
  with INBOX's letters in any case up to a wildcard or the separator, or spells
  ``I%B%X``-style; :func:`_inboxcase`, as Dovecot's ``pattern_is_inboxcase``), a name's
  first five characters ``INBOX`` (as the whole name or before the separator) are
  compared without case: ``inbox*``, ``i*``, ``*box`` and ``In%`` list INBOX.
* ``*`` matches any characters, ``%`` any but the separator (RFC 3501 6.3.8).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from .imap import mutf7

__all__ = ["list_matcher", "unicode_name", "wildcard_match"]

_INBOX = "INBOX"
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def unicode_name(raw: bytes) -> str:
    """The characters a mailbox name or pattern stands for: decoded from modified UTF-7 when
    it is valid, else its bytes as UTF-8 (undecodable bytes kept as surrogate escapes)."""
    if raw.isascii() and b"&" not in raw:
        return raw.decode("ascii")
    try:
        return mutf7.decode(raw)
    except ValueError:
        return raw.decode("utf-8", "surrogateescape")


def _upper(text: str) -> str:
    return text.translate(_ASCII_UPPER)


def _compress(pattern: str) -> str:
    """Runs of wildcards as one: ``%%`` is ``%``, any run holding ``*`` is ``*``."""
    return re.sub(r"[*%]+", lambda m: "*" if "*" in m.group() else "%", pattern)


def _inboxcase(pattern: str, separator: str) -> bool:
    """May *pattern* stand for INBOX, so that INBOX's letters match it in any case?"""
    i = 0
    while i < len(pattern) and i < len(_INBOX) and _upper(pattern[i]) == _INBOX[i]:
        i += 1
    rest = pattern[i:]
    if not rest.startswith("%"):
        return rest[:1] in ("*", separator) or (i == len(_INBOX) and not rest)
    inbox_at = i  # INBOX's letters already matched
    j = i
    while j < len(pattern) and pattern[j] not in ("*", separator):
        if pattern[j] != "%":
            k = _INBOX.find(_upper(pattern[j]), inbox_at)
            if k < 0:
                return False
            inbox_at = k + 1
            if inbox_at == len(_INBOX):
                j += 1
                if pattern[j:j + 1] == "%":
                    j += 1
                return pattern[j:j + 1] in ("", "*", separator)
        j += 1
    return True


# Python's re backtracks: ".*a" repeated a dozen times against a name of forty "a"s runs for
# minutes and would stop every session of the process. A pattern with more wildcards than
# this is matched by _Automaton, in time linear in the name's length.
_REGEX_WILDCARDS = 2


@lru_cache(maxsize=1024)
def _regex(pattern: str, separator: str) -> re.Pattern[str]:
    not_sep = f"[^{re.escape(separator)}]*"
    return re.compile("".join(".*" if c == "*" else not_sep if c == "%" else re.escape(c) for c in pattern),
                      re.DOTALL)


class _Automaton:
    """The pattern as a set of positions run over a name a character at a time (bit i: the
    pattern's first i characters match what was read); never backtracks. *inboxcase*: the
    name's first five characters (INBOX's) match the pattern's letters in any case."""

    def __init__(self, pattern: str, separator: str) -> None:
        self.separator = separator
        self.final = 1 << len(pattern)
        self.star = self.percent = 0
        self.literal: dict[str, int] = {}
        for i, c in enumerate(pattern):
            if c == "*":
                self.star |= 1 << i
            elif c == "%":
                self.percent |= 1 << i
            else:
                self.literal[c] = self.literal.get(c, 0) | 1 << i
        self.wild = self.star | self.percent

    def _closed(self, states: int) -> int:
        return states | (states & self.wild) << 1  # a wildcard matches nothing (none is next to another)

    def matches(self, name: str, inboxcase: bool) -> bool:
        states = self._closed(1)
        for j, c in enumerate(name):
            lit = self.literal.get(c, 0)
            if inboxcase and j < len(_INBOX):
                lit |= self.literal.get(c.lower(), 0) | self.literal.get(_upper(c), 0)
            moved = (states & lit) << 1 | states & self.star
            if c != self.separator:
                moved |= states & self.percent
            states = self._closed(moved)
            if not states:
                return False
        return bool(states & self.final)


def pattern_text(raw: bytes) -> str:
    """The characters a LIST reference or pattern stands for, each read on its own as Dovecot reads
    them (mutf7.decode_pattern: 8-bit UTF-8 as it is, else strict modified UTF-7), else as sent."""
    try:
        return mutf7.decode_pattern(raw)
    except ValueError:
        return raw.decode("utf-8", "surrogateescape")


def list_matcher(pattern: bytes, separator: str, reference: bytes = b"") -> Callable[[bytes], bool]:
    """A test of raw mailbox names against the raw LIST *reference* and *pattern* (the same test
    for the same short ones: built once, ~40 % of a one-mailbox LIST's matching)."""
    if len(pattern) + len(reference) <= _CACHED:
        return _cached_matcher(pattern, separator, reference)
    return _matcher(pattern, separator, reference)


def _everything(_name: bytes) -> bool:
    return True


def _matcher(pattern: bytes, separator: str, reference: bytes) -> Callable[[bytes], bool]:
    text = _compress(pattern_text(reference) + pattern_text(pattern))
    if text == "*":  # any characters, INBOX's in any case among them: every name
        return _everything
    inboxcase = _inboxcase(text, separator)
    automaton = _Automaton(text, separator)
    regex = _regex(text, separator) if sum(c in "*%" for c in text) <= _REGEX_WILDCARDS else None

    def matches(name: bytes) -> bool:
        chars = unicode_name(name)
        under_inbox = (inboxcase and _upper(chars[:len(_INBOX)]) == _INBOX
                       and chars[len(_INBOX):len(_INBOX) + 1] in ("", separator))
        if regex is not None and not under_inbox:
            return regex.fullmatch(chars) is not None
        return automaton.matches(chars, under_inbox)

    return matches


_CACHED = 256  # bytes of reference and pattern up to which a matcher is kept (a client's hostile ones are not)
_cached_matcher = lru_cache(maxsize=256)(_matcher)


@lru_cache(maxsize=1024)
def _wildcards(pattern: str, separator: str) -> _Automaton | str:
    """The automaton of *pattern*; the text before its one trailing ``*`` (the common rule
    ``Shared/*``: a prefix test), or the pattern itself without a wildcard (equality), as a str."""
    pattern = _compress(pattern)
    head = pattern[:-1] if pattern.endswith("*") else pattern
    if "*" not in head and "%" not in head:
        return pattern
    return _Automaton(pattern, separator)


def wildcard_match(pattern: str, name: str, separator: str) -> bool:
    """``*`` and ``%`` of *pattern* against *name*, character for character as given (no decoding,
    case kept), in time linear in the name's length: the map's rules (routing.py) are matched
    against names a client chooses, where a backtracking regex would let one command stop the process."""
    matcher = _wildcards(pattern, separator)
    if type(matcher) is str:
        return name.startswith(matcher[:-1]) if matcher.endswith("*") else name == matcher
    assert isinstance(matcher, _Automaton)
    return matcher.matches(name, False)
