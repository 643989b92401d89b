"""CREATE directly inside a mailbox a move placed: the new mailbox goes with its parent.

Placements are per name: after ``RENAME Projects Work`` across servers or ``move alice Projects b2``,
``Work`` and its children are placed on b2, and a ``CREATE Work/new`` went where the rules (or the default)
send ``Work/new``: the tree split over two servers, its next RENAME refused [CANNOT] (probe v2 of stop 52).
Here such a name is created on its parent's backend, then placed there. Only the direct parent counts (a
grandchild follows its own parent, wherever that lives: probe z1 of stop 53), never INBOX (a move of INBOX
leaves its children where they are, RFC 3501 6.3.5), and not for a referral-aware client (referred where the
rules send it, as before: a placement made for a referral the client may never follow pulled later CREATEs
of the name away from a parent moved back, probe z1). A name already where the rules send it stays there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .imap.reader import Command
from .imap.response import completion_text
from .listing import command_pieces
from .mailops import exists
from .routing import MailboxMap, Route, normalize


def kin_route(mailbox_map: MailboxMap, user: str, mailbox: bytes, route: Route) -> Route | None:
    """The route of *mailbox*'s parent when that parent has a placement (not INBOX) and lives elsewhere than
    *route* (the rules' choice for it), and *mailbox* has no placement of its own; else None (as before)."""
    sep = mailbox_map.separator
    name = normalize(mailbox.decode("utf-8", "surrogateescape"), sep)
    parent, found, _ = name.rpartition(sep)
    if not found or not parent or parent == "INBOX":
        return None
    placed = mailbox_map.placements(user)
    backends = placed.get(parent)
    if backends is None or name in placed or backends[0] == route.primary:
        return None
    return Route(backends)


async def create_with_kin(host: Any, cmd: Command, mailbox: bytes, route: Route,
                          moving: Callable[[bytes], bool], inuse: str) -> None:
    """Created on the parent's backend, then placed there (before the client hears OK); where the rules send it
    when one is there already (that backend answers ALREADYEXISTS, as directly). *host* is the session
    (mailboxes.MailboxHost); *moving*: a name a move holds (answered *inuse*). The parent is looked at again after each wait (a
    move of it meanwhile: probe z1). A crash between the CREATE and its placement leaves the mailbox out of
    sight until the user's next CREATE of it (sent there again, ALREADYEXISTS, placed)."""
    pool, mailbox_map, user = host.pool, host.mailbox_map, host.user
    assert pool is not None and user is not None
    text = mailbox.decode("utf-8", "surrogateescape")
    conn = await pool.ready_for(route)
    if await exists(conn, text):
        return host.relay.send(conn, cmd.tag, cmd.name, cmd.args)
    parent = mailbox.rpartition(mailbox_map.separator.encode())[0]
    kin = kin_route(mailbox_map, user, mailbox, route)
    if moving(mailbox) or moving(parent):
        return host.answer(cmd.tag, "NO " + inuse)
    if kin is None:  # moved meanwhile, or placed: where the map sends it now
        there = await pool.ready_for(mailbox_map.lookup(user, text))
        return host.relay.send(there, cmd.tag, cmd.name, cmd.args)
    there = await pool.ready_for(kin)
    text_part, then = command_pieces("CREATE", cmd.args)  # the client's argument (Dovecot refuses some forms)
    result = await there.command(text_part, then=then)
    if result.ok or (result.start.code == "ALREADYEXISTS" and await exists(there, text)):
        await mailbox_map.place(user, text, kin.backends)
    for r in result.responses:
        host.write_from(there, r.raw)
    host.answer(cmd.tag, completion_text(result.start))
