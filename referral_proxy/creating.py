"""CREATE inside a mailbox a move placed: the new mailbox goes with its parent.

Placements are per name: after ``RENAME Projects Work`` across servers or ``move alice Projects b2``,
``Work`` and its children are placed on b2, and a ``CREATE Work/new`` went where the rules (or the default)
send ``Work/new``: the tree split over two servers, its next RENAME refused [CANNOT] (probe v2 of stop 52).
Here such a name is placed on the backend of its nearest placed parent first, then created there (or
referred there); a name that already exists where the rules send it stays there (it would be out of reach).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .imap.reader import Command
from .mailops import exists
from .routing import MailboxMap, Route, normalize


def kin_route(mailbox_map: MailboxMap, user: str, mailbox: bytes, route: Route) -> Route | None:
    """The route of *mailbox*'s nearest parent that has a placement, when *mailbox* has none of its own and
    that parent lives elsewhere than *route* (the rules' choice for it); else None (created as before)."""
    sep = mailbox_map.separator
    name = normalize(mailbox.decode("utf-8", "surrogateescape"), sep)
    placed = mailbox_map.placements(user)
    if not placed or name in placed:
        return None
    parts = name.split(sep)
    for end in range(len(parts) - 1, 0, -1):
        backends = placed.get(sep.join(parts[:end]))
        if backends is not None:
            return Route(backends) if backends[0] != route.primary else None
    return None


async def create_with_kin(host: Any, cmd: Command, mailbox: bytes, route: Route, kin: Route,
                          refer: Callable[[Route, bytes], bytes | None]) -> None:
    """Placed with its parent, then created (or referred) there; where the rules send it when it is already
    there (that backend answers ALREADYEXISTS, as it would directly). *host* is the session (mailboxes.MailboxHost);
    *refer* its referral to the route, if it refers. A placement whose CREATE was refused
    stays (nothing is there, nor where the rules send it: harmless, and the next CREATE of it goes there too)."""
    pool, mailbox_map, user = host.pool, host.mailbox_map, host.user
    assert pool is not None and user is not None
    text = mailbox.decode("utf-8", "surrogateescape")
    conn = await pool.ready_for(route)
    if await exists(conn, text):
        return host.relay.send(conn, cmd.tag, cmd.name, cmd.args)
    await mailbox_map.place(user, text, kin.backends)  # first: from now on every session sends it there
    referral = refer(kin, mailbox)
    if referral is not None:
        return host.refuse(referral)
    there = await pool.ready_for(kin)  # a refusal there leaves the placement: the next CREATE goes there again
    host.relay.send(there, cmd.tag, cmd.name, cmd.args)
