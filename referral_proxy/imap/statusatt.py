"""STATUS item lists as RFC 3501 and its extensions define them.

A STATUS the proxy relays is judged by its backend. One it answers itself (a referral,
RFC 2193 4.1) must first be a command the remote server would take: RFC 3501's ``status =
"STATUS" SP mailbox SP "(" status-att *(SP status-att) ")"`` has one item at least, each an
atom naming an item; an extension's item only where the server announces the extension. A
list that is not one is BAD (RFC 3501 7.1.5), as the remote answers it, never a referral
the client would follow only to meet that BAD.
"""

from __future__ import annotations

from collections.abc import Collection

from .command import Atom, ParenList

__all__ = ["STATUS_ITEMS", "status_list_problem"]

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


def _announced(needs: tuple[str, ...], capabilities: Collection[str]) -> bool:
    return any(cap in capabilities or any(c.startswith(cap + "=") for c in capabilities) for cap in needs)
