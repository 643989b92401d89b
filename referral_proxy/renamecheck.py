"""A RENAME across servers checked before it holds any name.

A move's reservations (journal.py) take its names from the moment it begins, and every session
that has one of them selected is ended with a BYE (relocation.py: the move may rename it aside
within a fraction of a second). A RENAME that its own checks then refuse -- its source absent,
its destination there -- ended those sessions all the same (helper attack14a: session b SELECTs
Shared/B; session a's ``RENAME A Shared/B``, A absent, is answered NO [NONEXISTENT] and b's next
command finds its connection closed), where Dovecot alone leaves b alone. Here the same checks
run first, on connections of their own, before anything is reserved: a RENAME that fails them
never begins. Mover.rename runs them again under its reservations (what changed in between).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .backend import BackendProtocol
from .hierarchy import exists_on, refusal
from .journal import Reservation
from .listmatch import unicode_name
from .mailops import TransferError
from .routing import MailboxMap, normalize

__all__ = ["checked", "refused_before"]


class Mover(Protocol):
    """What of mover.Mover the checks use (mover.py imports this module)."""

    mailbox_map: MailboxMap
    user: str
    routed: bool  # the source is where the map sends the name (an old home's INBOX is not: oldhome.py)

    @property
    def connect(self) -> Callable[[str], Awaitable[BackendProtocol]]: ...

    async def plan(self, src: BackendProtocol, old: str, new: str) -> list[tuple[str, str]]: ...

    async def check(self, src: BackendProtocol, dst: BackendProtocol, pairs: list[tuple[str, str]]) -> None: ...


async def checked(mover: Mover, conns: list[BackendProtocol], old: str, new: str, src_name: str,
                  dst_name: str) -> tuple[BackendProtocol, BackendProtocol, list[tuple[str, str]]]:
    """Connect to both backends (appended to *conns*), check the move: its (src, dst, pairs), or
    TransferError saying why it is refused (a child elsewhere, the source absent, moved meanwhile, ...)."""
    looked = "INBOX" if old == new == "*" else old  # (a whole user: from the home)
    if mover.routed and (now := (await mover.mailbox_map.lookup_now(mover.user, looked)).primary) != src_name:
        # A move that held the name meanwhile took it elsewhere: two `move alice INBOX` at once carried an empty
        # INBOX from the first one's source, stranding the mail it had moved (probe e4 of stop 56)
        raise TransferError(await moved_meanwhile(mover.connect, mover.mailbox_map, mover.user, looked, now,
                                                  f"[INUSE] Mailbox was moved from {src_name} to {now} meanwhile; try again"))
    src = await mover.connect(src_name)
    conns.append(src)
    dst = await mover.connect(dst_name)
    conns.append(dst)
    refused = await refusal(mover.mailbox_map, mover.user, old, src_name, mover.connect) if new != old else None
    if refused:
        raise TransferError(refused)
    pairs = await mover.plan(src, old, new)
    await mover.check(src, dst, pairs)
    return src, dst, pairs


async def moved_meanwhile(connect: Callable[[str], Awaitable[BackendProtocol]], mailbox_map: MailboxMap, user: str,
                          name: str, backend: str, moved: str) -> str:
    """The answer to a RENAME whose name the map sends elsewhere since it was routed: *moved* if a move placed it on
    *backend* (where it goes now), which has it; else Dovecot's own NONEXISTENT: another RENAME or a DELETE won
    (probe k3 of stop 59: the loser of two RENAMEs was told the mailbox had moved to another server), also when
    a mailbox of that name was made anew where the rules send it (probe l5 F1: DELETE and CREATE pipelined)."""
    placed = mailbox_map.placements(user).get(normalize(name, mailbox_map.separator))
    if placed is not None and placed[0] == backend and await exists_on(connect, backend, name):
        return moved
    shown = unicode_name(name.encode("utf-8", "surrogateescape"))  # as Dovecot names it: decoded (probe k5 F4)
    return "[NONEXISTENT] Mailbox doesn't exist" + (f": {shown}" if shown.isprintable() else "")


async def refused_before(mover: Mover, old: str, new: str, src_name: str, dst_name: str) -> None:
    """Raise Mover.rename's TransferError if its checks fail now; anything else (a backend down)
    is left for Mover.rename to meet and answer as it does.

    A refusal while another operation holds one of the names is not given: the checks may have
    seen that operation half done (helper attack17: ``RENAME A FarB`` had created FarB on b2 and not
    yet emptied A when ``RENAME FarB A`` looked, and got NO [ALREADYEXISTS], an answer Dovecot, one
    RENAME after the other, never gives: NONEXISTENT before, OK after). Mover.rename then meets the
    holder: NO [INUSE] at once for a move under way, or it waits for a brief one and checks again."""
    conns: list[BackendProtocol] = []
    try:
        await checked(mover, conns, old, new, src_name, dst_name)
    except TransferError:
        sep = mover.mailbox_map.separator
        if mover.mailbox_map.holders(mover.user, [Reservation(old, subtree=normalize(old, sep) != "INBOX"),
                                                  Reservation(new)]):
            return
        raise
    except Exception:  # noqa: BLE001 -- the move itself meets it again, and says so
        return
    finally:
        for conn in conns:
            conn.logout()
