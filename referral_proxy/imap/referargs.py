"""The arguments beside the mailbox of a command the proxy refers, checked as the remote server checks them.

A command the proxy relays is judged by its backend. One it answers itself with a referral
(RFC 2193) must first be a command the remote server would take: else the client follows
the URL only to meet a BAD there (RFC 3501 7.1.5: BAD is for a command that is not valid).
So a referral is given only for

* a STATUS list as RFC 3501 defines it (``"(" status-att *(SP status-att) ")"``: one item at
  least, each an atom naming an item; an extension's item only where the remote server
  announces the extension);
* SELECT/EXAMINE parameters (RFC 4466) the remote server takes: CONDSTORE where it announces
  it, QRESYNC with its parameters only once the session enabled QRESYNC (RFC 7162 3.2.5: "A
  server MUST respond with a tagged BAD ... if the client hasn't issued ENABLE QRESYNC"); an
  empty list is taken, as Dovecot takes it.

Sequence sets (COPY/MOVE) are the grammar's (grammar.is_sequence_set).
"""

from __future__ import annotations

from collections.abc import Collection

from .command import Atom, ParenList, Token
from .grammar import is_sequence_set

__all__ = ["STATUS_ITEMS", "status_list_problem", "select_params_problem"]

#: Each item, and the capabilities one of which announces it (none: RFC 3501's own).
STATUS_ITEMS: dict[bytes, tuple[str, ...]] = {
    b"MESSAGES": (), b"RECENT": (), b"UIDNEXT": (), b"UIDVALIDITY": (), b"UNSEEN": (),
    b"SIZE": ("STATUS=SIZE",),  # RFC 8438
    b"HIGHESTMODSEQ": ("CONDSTORE", "QRESYNC"),  # RFC 7162
    b"APPENDLIMIT": ("APPENDLIMIT",),  # RFC 7889 (announced as APPENDLIMIT or APPENDLIMIT=n)
    b"MAILBOXID": ("OBJECTID",),  # RFC 8474
    b"DELETED": ("IMAP4REV2", "QUOTA=RES-MESSAGE"),  # RFC 9051, RFC 9208
    b"DELETED-STORAGE": ("QUOTA=RES-STORAGE",),  # RFC 9208
}

_MAX_UID = 0xFFFFFFFF
_MAX_MODSEQ = 0x7FFFFFFFFFFFFFFF


def status_list_problem(items: ParenList, capabilities: Collection[str] | None) -> str | None:
    """Why *items* is no status list the server of *capabilities* (upper-cased names as it
    announces them; None: not known, any item defined above is taken) would take; None if it is one."""
    if not items.items:
        return "Empty status list"
    for item in items.items:
        if type(item) is not Atom:
            return "Status list contains non-atoms"
        needs = STATUS_ITEMS.get(item.value.upper())
        if needs is None or (needs and capabilities is not None and not _announced(needs, capabilities)):
            return "Invalid status item " + item.value.decode("ascii", "replace")
    return None


def select_params_problem(params: ParenList, capabilities: Collection[str] | None, qresync_enabled: bool) -> str | None:
    """Why *params* (SELECT/EXAMINE's list) are none the remote server of *capabilities* takes; None if taken."""
    items = list(params.items)
    while items:
        name = items.pop(0)
        if type(name) is not Atom:
            return "SELECT options contain non-atoms"
        upper = name.value.upper()
        if upper == b"CONDSTORE":
            if capabilities is not None and not _announced(("CONDSTORE", "QRESYNC"), capabilities):
                return "Unknown SELECT parameter CONDSTORE"
        elif upper == b"QRESYNC":
            if not qresync_enabled:
                return "QRESYNC not enabled"
            if not items or not _qresync_params(items.pop(0)):
                return "Invalid QRESYNC parameters"
        else:
            return "Unknown SELECT parameter " + name.value.decode("ascii", "replace")
    return None


def _qresync_params(tok: Token) -> bool:
    """RFC 7162: ``"(" uidvalidity SP mod-sequence-value [SP known-uids] [SP seq-match-data] ")"``."""
    if type(tok) is not ParenList or not 2 <= len(tok.items) <= 4:
        return False
    uidvalidity, modseq, *rest = tok.items
    if not (_number(uidvalidity, 1, _MAX_UID) and _number(modseq, 0, _MAX_MODSEQ)):
        return False
    if rest and type(rest[0]) is Atom:
        if not is_sequence_set(rest[0].value) or b"*" in rest[0].value or rest[0].value == b"$":
            return False
        rest = rest[1:]
    if rest:
        match = rest[0]
        if len(rest) > 1 or type(match) is not ParenList or len(match.items) != 2:
            return False
        return all(type(t) is Atom and is_sequence_set(t.value) and t.value != b"$" for t in match.items)
    return True


def _number(tok: Token, low: int, high: int) -> bool:
    return type(tok) is Atom and tok.value.isdigit() and low <= int(tok.value) <= high


def _announced(needs: tuple[str, ...], capabilities: Collection[str]) -> bool:
    return any(cap in capabilities or any(c.startswith(cap + "=") for c in capabilities) for cap in needs)
