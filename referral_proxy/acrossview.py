"""The answers of a COPY / MOVE across servers where the selected session must read them as
Dovecot's own (the differential corpus, tests/differential/corpus/40-attack11-across-view.imapc,
compares them). Apart from transfer.py, which is at its size limit."""

from __future__ import annotations

from .imap.response import ResponseStart

__all__ = ["SAVED", "NOTHING_NAMED", "EXPUNGE_ISSUED", "moved_text"]

#: RFC 5182's ``$``: the result the last ``SEARCH RETURN (SAVE)`` kept. It may be empty (a SEARCH
#: that failed empties it) or name messages expunged since: Dovecot answers ``OK No messages
#: found.`` then, also to COPY/MOVE without UID, never BAD as for a sequence set past the end.
SAVED = b"$"

#: Dovecot's answer (after OK) to a COPY / MOVE whose set names no message that is there.
NOTHING_NAMED = "No messages found."

#: Dovecot's own COPY / MOVE when a message it names was expunged by another session, before the
#: command (an EXPUNGE this session has not heard yet) or while it runs: NO, nothing copied or moved
#: (its transaction is rolled back). The proxy's MULTIAPPEND is aborted then: nothing saved either.
#: It copied or moved the rest before (commit 5aaf23b); the differential corpus showed Dovecot does not.
EXPUNGE_ISSUED = "[EXPUNGEISSUED] Some of the requested messages no longer exist."


def moved_text(expunged: ResponseStart | None) -> str:
    """The tagged text of a MOVE across, after OK. With QRESYNC enabled on the session, Dovecot's
    own MOVE says ``[HIGHESTMODSEQ n]`` there (RFC 7162 3.2.10: the mailbox's HIGHESTMODSEQ after
    the expunges, for a client to resume from); our UID EXPUNGE on that session's connection got
    exactly that code from the backend, and it is passed on. *expunged*: None if nothing was left
    to remove (others moved or expunged every message meanwhile)."""
    if expunged is None:
        return "No messages moved (they were gone)."
    if expunged.code == "HIGHESTMODSEQ" and expunged.code_args.isdigit():
        return f"[HIGHESTMODSEQ {expunged.code_args.decode()}] Move completed."
    return "Move completed."
