"""Which commands take the fast path: relayed as the client wrote them, unparsed.

A command the declared table (commands.py) relays to the selected or home backend
through the plain relay handler, whose arguments nothing reads but the relay (no
mailbox to route by, no tag inside them, no state it changes), is passed on as its
line when the line is plain (imap.plain: its canonical re-encoding is the line
itself). Its admission is unchanged: the session's table and state decide first,
and every client limit holds, as for any command (imap.reader).
"""

from __future__ import annotations

from .commands import COMMANDS
from .imap.plain import PLAIN_GRAMMARS

__all__ = ["PLAIN_COMMANDS"]

# The handlers that only relay: to the selected mailbox's backend (home if none), or home.
_RELAY_ONLY = frozenset({"to_selected", "to_home"})

#: FETCH, STORE, UID EXPUNGE ... (CHECK, EXPUNGE: no arguments, never parsed anyway).
PLAIN_COMMANDS: frozenset[str] = frozenset(
    spec.name for spec in COMMANDS.values()
    if spec.handler in _RELAY_ONLY and not spec.tag_refs and not spec.tag_args and spec.grammar.text in PLAIN_GRAMMARS
)
