"""Subscriptions through a move across servers: a moved name's go with it; a renamed one's stay in sight.

RFC 3501 6.3.6: a RENAME leaves the old name subscribed, and Dovecot refuses to SUBSCRIBE a name that is no
mailbox, so it stays on the source. A source that then held nothing else of the user's was asked by no LSUB:
a mailbox the administrator had moved to b2, RENAMEd back to b1, left its old name subscribed on b2 unseen;
UNSUBSCRIBE answered OK and left it, and it came back with the user's next mailbox on b2 (probe y1 of stop
53). Such a source is recorded among the user's backends (a private placement), so LSUB and UNSUBSCRIBE reach it;
so is an old home keeping subscriptions of names that were no mailboxes (once the rules send them to the new home,
nothing else of the user's is there: the same probe, `move carol '*' b2` then the default pointed at b2).
"""

from __future__ import annotations

from collections.abc import Sequence

from .backend import BackendProtocol
from .mailops import name_arg, run_ok, subscribed
from .routing import MailboxMap, normalize
from .staging import ASIDE_PREFIX

#: A private placement of a backend keeping subscriptions of names that route elsewhere.
KEPT_PREFIX = ASIDE_PREFIX.decode() + "subscriptions/"


async def carry_subscriptions(mailbox_map: MailboxMap, user: str, src: BackendProtocol, dst: BackendProtocol,
                              pairs: Sequence[tuple[str, str]]) -> None:
    """Before the placements change (a redo after a crash does it again)."""
    subs = await subscribed(src)
    placed, sep = mailbox_map.placements(user), mailbox_map.separator
    keeps = False
    for o, n in pairs:
        if o not in subs:
            continue
        if o == n:  # moved: subscribed at its new backend (and unsubscribed at the source once drained)
            await run_ok(dst, b"SUBSCRIBE " + name_arg(n), "SUBSCRIBE")
        elif normalize(o, sep) != "INBOX" and normalize(o, sep) in placed:  # its placement goes at Step.PLACED
            keeps = keeps or mailbox_map.rule_route(user, o).primary != src.name
    moved = {o for o, n in pairs if o == n}
    if any(normalize(o, sep) == "INBOX" for o in moved) and subs - moved - {"INBOX"}:
        keeps = True  # the home moved: names subscribed there and not moved (no mailbox) stay in sight
    if keeps and KEPT_PREFIX + src.name not in placed:
        await mailbox_map.place(user, KEPT_PREFIX + src.name, [src.name])
