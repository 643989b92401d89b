"""What a mailbox holds, read straight from a backend: how the tests judge the proxy."""

from __future__ import annotations

import hashlib
import imaplib
import re
import time

from referral_proxy.fleet import Dovecot


def contents(backend: Dovecot, user: str, mailbox: str, timeout: float | None = None) -> list[tuple[int, frozenset, float, str]]:
    """(uid, flags without \\Recent, internal date as a timestamp, sha256 of the body) per
    message, in UID order; [] for an empty or missing mailbox. *timeout*: of a backend just
    restarted after a SIGKILL (a lock the killed process left may hold its SELECT a while)."""
    with (backend.client(user) if timeout is None else backend.client(user, timeout=timeout)) as m:
        typ, data = m.select(f'"{mailbox}"', readonly=True)
        if typ != "OK" or data == [b"0"]:
            return []
        typ, data = m.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
        out = []
        for item in data:
            if isinstance(item, tuple):
                meta, body = item
                uid = int(re.search(rb"UID (\d+)", meta).group(1))
                flags = frozenset(re.search(rb"FLAGS \(([^)]*)\)", meta).group(1).split()) - {b"\\Recent"}
                date = time.mktime(imaplib.Internaldate2tuple(meta))
                out.append((uid, flags, date, hashlib.sha256(body).hexdigest()))
        return sorted(out)


def same_messages(a, b) -> bool:
    """The same messages (flags, dates, bodies), whatever their UIDs."""
    return sorted((x[1], x[2], x[3]) for x in a) == sorted((x[1], x[2], x[3]) for x in b)
