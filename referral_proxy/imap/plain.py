"""Command arguments that need no parse: a line of plain tokens is its own canonical encoding.

``FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])`` or ``STORE 3 +FLAGS (\\Seen)``:
printable atoms (sections included), quoted strings without escapes and lists two
deep, one space apart. For such a line the full parse, the grammar check and the
re-encoding (command.parse_arguments, grammar.match, grammar.encode) give back the
line itself, byte for byte (tests/test_plain.py proves it with hypothesis), so a
relayed command whose arguments the proxy does not route by can skip them. Anything
else (a literal, 8-bit bytes, an escape, odd spacing, deeper lists) takes the long way.
"""

from __future__ import annotations

import re

__all__ = ["PLAIN_GRAMMARS", "plain_arguments"]

_ATOM_CHAR = rb"[A-Za-z0-9.:,*$<>+_\-\\!#&'/=?@^~|]"
_SECTION = rb"\[[A-Za-z0-9.:<>\-]*+(?: \([A-Za-z0-9.:\-]++(?: [A-Za-z0-9.:\-]++)*+\))?+\]"
_ATOM = rb"(?:" + _ATOM_CHAR + rb"|" + _SECTION + rb")++"
_QUOTED = rb'"[ !#-\[\]-~]*+"'
_FLAT = rb"(?:" + _ATOM + rb"|" + _QUOTED + rb")"
_LIST1 = rb"\((?:" + _FLAT + rb"(?: " + _FLAT + rb")*+)?+\)"
_ITEM = rb"(?:" + _ATOM + rb"|" + _QUOTED + rb"|" + _LIST1 + rb")"
_LIST2 = rb"\((?:" + _ITEM + rb"(?: " + _ITEM + rb")*+)?+\)"
_TOKEN = rb"(?:" + _ATOM + rb"|" + _QUOTED + rb"|" + _LIST2 + rb")"
_TOKENS = _TOKEN + rb"(?: " + _TOKEN + rb")*+"
# grammar.py's sequence set, followed by SP or the end.
_SEQSET = rb"(?:\$|[0-9*]++(?::[0-9*]++)?+(?:,[0-9*]++(?::[0-9*]++)?+)*+)"

#: Grammar texts (commands.py) whose arguments may skip the parse, and the whole-line pattern.
PLAIN_GRAMMARS: dict[str, re.Pattern[bytes]] = {
    "seqset": re.compile(_SEQSET),
    "seqset any+": re.compile(_SEQSET + rb" " + _TOKENS),
    "any+": re.compile(_TOKENS),
}


def plain_arguments(grammar: str, rest: bytes) -> bool:
    """True if *rest*, the arguments of a command of *grammar*, is its own canonical encoding."""
    pattern = PLAIN_GRAMMARS.get(grammar)
    return pattern is not None and pattern.fullmatch(rest) is not None
