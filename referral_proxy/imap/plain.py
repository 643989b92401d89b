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
# One or more tokens, one space apart (the token pattern once: it is compiled at import).
_TOKENS = re.compile(rb"(?:" + _TOKEN + rb"(?:\Z| (?!\Z)))++")
# grammar.py's sequence set, numbers of at most nine digits (a longer one, or a zero, takes the long way).
_NUM = rb"(?:0*+[1-9][0-9]{0,8}+|\*)"
_SEQSET = re.compile(rb"\$|" + _NUM + rb"(?::" + _NUM + rb")?+(?:," + _NUM + rb"(?::" + _NUM + rb")?+)*+")

#: Grammar texts (commands.py) whose arguments may skip the parse.
PLAIN_GRAMMARS = frozenset({"seqset", "seqset any+", "any+"})


def plain_arguments(grammar: str, rest: bytes) -> bool:
    """True if *rest*, the arguments of a command of *grammar*, is its own canonical encoding."""
    if grammar == "seqset any+":
        m = _SEQSET.match(rest)
        return (m is not None and rest[m.end():m.end() + 1] == b" "
                and _TOKENS.fullmatch(rest, m.end() + 1) is not None)
    if grammar == "any+":
        return _TOKENS.fullmatch(rest) is not None
    return grammar == "seqset" and _SEQSET.fullmatch(rest) is not None
