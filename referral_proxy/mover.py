"""Moving whole mailboxes between backends: a cross-server RENAME, the admin ``move`` (localrename.py: one backend's).

A mailbox move, journaled step by step (journal.py has the table):

1. Reserve the source and destination subtrees with the journal entry, in one store transaction, before reading
   anything (``NO [INUSE]`` for anyone else meanwhile).
2. Plan: the mailbox and its children that the source owns, by exact name and prefix (a name is never a LIST
   pattern); a destination name that exists refuses the move.
3. Create each destination mailbox (journaled before and after), copy its messages in bounded MULTIAPPEND batches,
   each verified by content (sha256 streamed, compared with the copy its APPENDUID names) before it is journaled.
4. COMMITTED: every first-pass message is verified. From here on the move is only ever finished, never undone:
   subscriptions, then placements (the map now routes the new names to the destination).
5. Each source, deepest first, is RENAMEd to a private name (a delivery to the old name goes to INBOX), what arrived
   meanwhile is copied and verified, exactly the verified UIDs are removed (drain.py: a copy whose source a client
   took away is taken back), and the private mailbox is deleted once seen empty, also read whole again
   (aside.hidden_messages). INBOX is emptied in place in rounds, never deleted; its old backend is watched.

Before COMMITTED a failure or a crash is rolled back: exactly the destination UIDs this move appended (recorded, or
for a batch in flight found by content above the UIDNEXT recorded before it; one whose source is gone only if its
content is elsewhere too: movefinish.unvouched) are expunged, and mailboxes it created deleted if nothing is in them.
"""

from __future__ import annotations

import collections
import functools
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from .appendturns import MoverTurn
from .aside import aside_gone, delete_if_empty, drop_marks, hidden_messages
from .backend import BackendProtocol
from .boxattrs import carry_attributes
from .copystream import BATCH_BYTES, BATCH_MESSAGES, atomic_target, batches, copy_surviving, surviving
from .drain import copied_of, remove_verified, resume, take_back_vanished
from .hierarchy import TAKEN, UNDER_ITSELF, kept_where_routed, placed_elsewhere, under_itself
from .holds import Appending, begin_waiting
from .imap.uidset import expand_uid_set, uid_set
from .journal import UNAVAILABLE, InUse, JournalEntry, LostEntry, Reservation, Step, StoreUnavailable
from .lastanswers import when_due
from .latecommit import take_back_doubled
from .mailops import (
    MessageInfo,
    NotReadAgain,
    TransferError,
    exists,
    expunge_uids,
    grants,
    highest_modseq,
    list_mailboxes,
    missing,
    myrights,
    name_arg,
    open_mailbox,
    run_ok,
    same_mailbox,
    search_uids,
    status,
    status_now,
    still_there,
    subtree,
)
from .movefinish import unvouched
from .movesubs import carry_subscriptions
from .relocation import seen_by_then
from .renamecheck import checked
from .routing import MailboxMap, normalize
from .staging import ASIDE_PREFIX, is_staging_name
from .transfer import Progress, find_copies, verify_copies
from .validity import create_unlike, drop_made, kept_uids, refuse_same_inbox, returns_past

__all__ = ["Mover", "MoveResult", "MoveIncomplete", "Connect", "BATCH_MESSAGES", "BATCH_BYTES"]

log = Logger()

ANSWER_WITHIN = 10.0  # seconds a client waits past the commit point before it is answered
QUIET = 0.3  # seconds without a new message in a source before it is renamed aside
QUIET_BUDGET = 15.0  # seconds spent waiting for that quiet at most (then it is renamed anyway)
# INBOX's (never renamed): what still comes is carried by the old-home watch (oldhome.py), while a
INBOX_QUIET_BUDGET = 3.0  # whole-user move holding every name of the user's (NO [INUSE]) should not last longer
ASIDE_TIMEOUT = 30.0  # seconds the renamed source may take to be emptied and deleted
DRAIN_ROUNDS = 10  # INBOX: rounds of "copy what is new, expunge what is verified" before giving up
ASIDE = ASIDE_PREFIX.decode()  # staging.is_private_name: never listed to a client nor taken from one

Connect = Callable[[str], Awaitable[BackendProtocol]]


class MoveIncomplete(TransferError):
    """Past the commit point the move could not finish now; its entry stays for recovery. The new mailboxes
    hold every message already: not a failure to report as one. *result*: what was moved (``pending`` set)."""

    result: MoveResult | None = None


@dataclass
class MoveResult:
    mailboxes: int = 0
    messages: int = 0
    bytes: int = 0
    pending: bool = False  # committed; the old mailboxes are still being emptied (in the background)


@dataclass
class Mover:
    """Moves mailboxes of one user between backends, journaled so that a crash can be recovered."""

    mailbox_map: MailboxMap
    connect: Connect  # a NEW authenticated connection to a backend, as the user
    user: str
    progress: Progress = field(default_factory=Progress)
    clock: Any = None  # IReactorTime, for the waits below (None: none)
    answer_within: float | None = None  # return this many seconds past the commit point, finishing behind (None: wait)
    answer_clock: Any = None  # the clock of that wait alone (lastanswers.Hurry: a stop answers at once), else clock
    left_to_recovery: bool = field(default=False, init=False)  # a failure whose roll-back failed too (journaled)
    # seconds past its begin before which no source is drained nor set aside: the other processes on the store
    # that see a move only when they look (relocation.seen_within) end their sessions that have one selected first
    seen_by_others: float = 0.0
    turn: MoverTurn | None = None  # a source's turns for the drain's MOVE and RENAME aside (appendturns.MoverTurn)
    _began_at: float | None = field(default=None, init=False)
    same_inbox: bool = field(default=False, init=False)  # INBOX into one of its UIDVALIDITY (validity.kept_uids)
    inbox_seen: bool = True  # clients saw the source INBOX (an old home's none: its UIDs may change, any UIDVALIDITY)
    routed: bool = True  # the source is where the map sends the name (renamecheck.checked); an old home's is not

    def __post_init__(self) -> None:
        self.user = self.mailbox_map.canonical(self.user)
        self.sep = self.mailbox_map.separator

    # -- planning -----------------------------------------------------------------------

    async def plan(self, src: BackendProtocol, old: str, new: str) -> list[tuple[str, str]]:
        """(old, new) names of the mailbox and its children that *src* owns, parents first.

        ``old == new == "*"``: every mailbox of the user that *src* owns (a whole user)."""
        if old == new == "*":
            names = [e.name.decode("utf-8", "surrogateescape") for e in await list_mailboxes(src)
                     if e.selectable and not is_staging_name(e.name)]  # a staging mailbox is recovery's
        elif normalize(old, self.sep) == "INBOX":
            return [("INBOX", normalize(new, self.sep))]  # RFC 3501: INBOX's messages move, its children do not
        else:
            names = await subtree(src, old, self.sep)
        pairs = []
        for name in names:
            if self.mailbox_map.lookup(self.user, name).primary != src.name:
                continue  # a child placed elsewhere: an admin move leaves it (a RENAME was refused: hierarchy.py)
            if await missing(src, name):  # a parent DELETEd with children, listed still: only its children move
                continue
            name = normalize(name, self.sep)
            pairs.append((name, name if old == new == "*" else normalize(new + name[len(old):], self.sep)))
        pairs.sort(key=lambda p: (p[0] != "INBOX", p[0].count(self.sep), p[0]))
        return pairs

    def _reservations(self, data: dict) -> list[Reservation]:
        """The source and destination subtrees, and the private names the move renames sources to."""
        if (old := data["old"]) == (new := data["new"]) == "*":  # a whole user; a client's RENAME "*" x: a mailbox "*"
            return [Reservation(None)]
        names = [Reservation(old, subtree=normalize(old, self.sep) != "INBOX"), Reservation(ASIDE + data["token"])]
        return names if new == old else names + [Reservation(new)]

    def _aside(self, data: dict, tag: str) -> str:
        """A private name on a backend, reserved with the move: no client of the proxy reaches it."""
        return ASIDE + data["token"] + self.sep + tag

    async def check(self, src: BackendProtocol, dst: BackendProtocol, pairs: list[tuple[str, str]]) -> None:
        if not pairs:
            raise TransferError("[NONEXISTENT] Mailbox doesn't exist")
        atomic_target(dst)  # even an empty mailbox: mail delivered during the move is carried after (probe g2)
        for o, n in pairs:  # each source is emptied (t, e), then renamed aside and deleted (x), as Dovecot's RENAME needs x
            if not grants(src, (await myrights(src, o))[0], "te" if o == "INBOX" else "xte"):
                raise TransferError("[NOPERM] Permission denied: a mailbox to move cannot be emptied and deleted "
                                    "there (rights x, t and e needed); nothing was moved")
            inbox = normalize(n, self.sep) == "INBOX"
            if o != "INBOX" if inbox else await exists(dst, n):  # (into INBOX: as Dovecot, probe r1)
                raise TransferError("[ALREADYEXISTS] Target mailbox already exists.")  # Dovecot's words
            if inbox and self.inbox_seen:  # renumbered under the UIDVALIDITY kept?
                self.same_inbox = await refuse_same_inbox(src, dst, self.clock)
            if o != n and (placed_elsewhere(self.mailbox_map, self.user, n, dst.name)  # a child's new name
                           or await kept_where_routed(self.mailbox_map, self.user, n, dst.name, self.connect)):
                raise TransferError(TAKEN)

    # -- the move ------------------------------------------------------------------------

    async def rename(self, old: str, new: str, src_name: str, dst_name: str) -> MoveResult:
        """Move *old* (its children along) on *src_name* to *new* on *dst_name*; a RENAME with a child on
        another backend, or under its own subtree, is refused before anything changes (hierarchy.py)."""
        if new != old and under_itself(old, new, self.sep):
            raise TransferError(UNDER_ITSELF)
        data: dict[str, Any] = {"src": src_name, "dst": dst_name, "old": old, "new": new, "token": secrets.token_hex(4),
                "pairs": [], "created": [], "validity": {}, "batches": [], "pending": None, "aside": [],
                "drained": [], "settled": {}}  # settled: drain.py (an entry without it is an older version's)
        try:
            entry = await begin_waiting(self.mailbox_map, self.user, "move", self._reservations(data), data, self.clock,
                                        appends=True)
        except Appending as e:  # at another proxy on PostgreSQL (proxyappends.py); here: appendturns.py
            raise TransferError(str(e)) from None
        except InUse:
            raise TransferError("[INUSE] Mailbox is being moved or renamed by another command; try again shortly") from None
        except StoreUnavailable:
            raise TransferError(UNAVAILABLE) from None
        self._began_at = self.clock.seconds() if self.clock is not None else None
        conns: list[BackendProtocol] = []
        result = MoveResult()
        try:
            src, dst, pairs = await checked(self, conns, old, new, src_name, dst_name)
            for conn in conns:  # its commands go out only while the entry is surely ours (fencing.py)
                self.mailbox_map.fences.guard(conn, entry)
            data["pairs"] = [list(p) for p in pairs]
            await self.mailbox_map.step(entry, Step.PLANNED)
            for i, (o, n) in enumerate(pairs):
                if normalize(n, self.sep) != "INBOX":
                    data["at"] = i
                    await self.mailbox_map.step(entry, Step.CREATING)
                    await create_unlike(src, o, dst, n, self._aside(data, f"new-{i}"))
                    data["created"].append(i)  # journaled only once it exists: a roll-back deletes only ours
                    await self.mailbox_map.step(entry, Step.CREATED)
                await carry_attributes(src, o, dst, n, self.user)  # its ACL, METADATA (boxattrs.py)
                result.messages += await self._copy(entry, i, src, dst, o, delta=False)
            await take_back_vanished(self.mailbox_map, entry, src, dst)
            await self.mailbox_map.step(entry, Step.COMMITTED)
        except BaseException as e:
            for conn in conns:
                conn.logout()
            await self._undo(entry, e)
            raise
        finishing = defer.ensureDeferred(self._finish_and_close(entry, conns))
        result.mailboxes, result.bytes = len(pairs), self.progress.bytes
        try:
            clock = None if self.clock is None else self.answer_clock or self.clock
            result.pending = await when_due(finishing, clock, self.answer_within)  # past the commit point: not long
        except MoveIncomplete as e:
            result.pending = True
            e.result = result
            raise
        result.messages, result.bytes = result.messages + self.progress.carried, self.progress.bytes  # with the end's
        return result

    async def _finish_and_close(self, entry: JournalEntry, conns: list[BackendProtocol]) -> bool:
        """Past the commit point: finish on the move's connections; a failure leaves the entry to recovery."""
        try:
            await self._finish(entry, conns[0], conns[1])
            return True
        except BaseException as e:
            await self.mailbox_map.disown(entry)
            log.error("move {id} of {user} {old} -> {new}: committed, but finishing failed: {why}; "
                      "recovery will finish it", id=entry.id, user=self.user, old=entry.data["old"],
                      new=entry.data["new"], why=str(e))
            raise MoveIncomplete(f"the mailboxes are in their new place; emptying the old ones failed ({e}) "
                                 "and will be finished by recovery") from e
        finally:
            for conn in conns:
                conn.logout()

    async def _undo(self, entry: JournalEntry, why: BaseException) -> None:
        """A failure before the commit point: roll back, or leave the entry to recovery (the store's
        failed write, COMMITTED among them, may yet land: a hung server; recovery reads what did)."""
        if isinstance(why, StoreUnavailable):
            self.left_to_recovery = True
            await self.mailbox_map.disown(entry)
            log.error("move {id} of {user}: the map store failed ({why}): left to recovery",
                      id=entry.id, user=self.user, why=str(why))
            return
        try:
            await self.mailbox_map.record(entry)  # still ours? (stalled past its lease: recovery undid it)
            await self.roll_back(entry)
        except LostEntry:
            raise  # the client is told recovery took it over, not this process's next failure
        except BaseException as e:
            self.left_to_recovery = True
            await self.mailbox_map.disown(entry)
            log.error("move {id} of {user}: failed ({why}) and could not be rolled back now ({how}); "
                      "recovery will", id=entry.id, user=self.user, why=str(why), how=str(e))

    async def _copy(self, entry: JournalEntry, i: int, src: BackendProtocol, dst: BackendProtocol, box: str,
                    *, delta: bool) -> int:
        """Copy every message of *box* on *src* not copied yet to pair *i*'s destination, in verified batches."""
        data, new = entry.data, entry.data["pairs"][i][1]
        state = await open_mailbox(src, box, readonly=True)
        known = data["validity"].setdefault(str(i), state.uidvalidity)
        data.setdefault("uidnext", {}).setdefault(str(i), state.uidnext)  # no delivery since: no need to wait
        if known != state.uidvalidity:
            raise TransferError("a source mailbox was replaced during the move (UIDVALIDITY changed)")
        uids, _ = await search_uids(src, b"ALL")
        done = copied_of(entry, i)
        infos, moved = await surviving(src, [u for u in uids if u not in done]), 0
        if not infos:
            return 0
        target = await status_now(dst, new)  # dst may hold new selected (EXAMINEd by the last verification)
        lower = target.uidnext
        for batch in batches(infos):
            rec = {"pair": i, "src": uid_set(info.uid for info in batch).decode(), "validity": target.uidvalidity,
                   "uidnext": lower}
            data["pending"] = rec
            await self.mailbox_map.step(entry, Step.DELTA_COPYING if delta else Step.COPYING)

            async def record(batch: Sequence[MessageInfo], hashes: tuple[str, ...], rec: dict = rec) -> None:
                rec["src"], rec["hashes"] = uid_set(info.uid for info in batch).decode(), list(hashes)  # before the last
                await self.mailbox_map.record_before_commit(entry)  # byte: a recovery finds the copies by them

            copied, batch = await copy_surviving(src, batch, dst, new.encode("utf-8", "surrogateescape"), self.progress, record)
            if copied is None:  # each expunged by another session meanwhile
                continue
            moved += len(batch)
            rec["dst"] = uid_set(copied.uids).decode()  # known here: an undo in this process removes them
            if copied.uidvalidity != target.uidvalidity:  # the copies are in the new one: the undo looks there
                rec["validity"] = copied.uidvalidity
                await self.mailbox_map.record(entry)
                raise TransferError("a destination mailbox was replaced during the move (UIDVALIDITY changed)")
            try:
                await kept_uids(self.same_inbox and not delta, src, dst, [info.uid for info in batch], copied.uids)
                await verify_copies(dst, new, copied)
                rec["modseq"] = await highest_modseq(dst, new)  # the verified view's; changed past it: by a client
                del rec["hashes"]  # verified: the UIDs say it all from now on
                data["batches"].append(rec)
                data["pending"] = None
                await self.mailbox_map.step(entry, Step.DELTA_COPIED if delta else Step.COPIED)
            except LostEntry:  # committed after recovery took the move over and found nothing of it (probe k1)
                await take_back_doubled(self.mailbox_map, entry, self.connect, box, known,
                                        [info.uid for info in batch], new, copied, lower, self.clock)
                raise
            lower = max(copied.uids) + 1
        data["pending"] = None  # (a batch all expunged left its own)
        return moved

    # -- before the commit point: roll back ------------------------------------------------------

    async def roll_back(self, entry: JournalEntry) -> None:
        """Remove exactly what this move appended (by UID) and created (if nothing else is in it)."""
        data = entry.data
        if entry.step in (Step.RESERVED, Step.PLANNED):
            await self.mailbox_map.end_move(entry)
            return
        pairs, connect = data["pairs"], self.mailbox_map.fences.guarding(self.connect, entry)
        dst = await connect(data["dst"])
        src: BackendProtocol | None = None
        try:
            records = list(data["batches"]) + ([data["pending"]] if data.get("pending") else [])
            for rec in records:
                new = pairs[rec["pair"]][1]
                appended = expand_uid_set(rec["dst"]) if rec.get("dst") else []
                # A batch in flight at the crash: did it commit? Without hashes its last byte was never
                # sent (_find_pending finds nothing): the source, perhaps what failed, is not asked.
                if not rec.get("dst") and "hashes" in rec:
                    src = src or await connect(data["src"])
                    appended = [d for _s, d in await self._find_pending(entry, src, pairs[rec["pair"]][0], dst, rec)]
                if appended and await exists(dst, new):
                    if await same_mailbox(dst, new, rec["validity"]):
                        await expunge_uids(dst, appended)
                    await dst.deselect()
            created = set(data["created"]) | ({data["at"]} if entry.step is Step.CREATING else set())
            if entry.step is Step.CREATING:  # cut off while made under its private name (validity.create_unlike)
                await drop_made(dst, self._aside(data, f"new-{data['at']}"))
            for i in sorted(created, reverse=True):  # children first
                name = pairs[i][1]
                if not await delete_if_empty(dst, name, self._aside(data, f"undo-{i}"), self.sep):
                    log.warn("roll-back of move {id}: {name} on {b} holds mail that is not this move's: kept",
                             id=entry.id, name=name, b=dst.name)
        finally:
            dst.logout()
            if src is not None:
                src.logout()
        await self.mailbox_map.end_move(entry)
        log.info("move {id} of {user} ({old} -> {new}) rolled back", id=entry.id, user=self.user, old=data["old"],
                 new=data["new"])

    async def _find_pending(self, entry: JournalEntry, src: BackendProtocol, box: str, dst: BackendProtocol,
                            rec: dict) -> list[tuple[int, int]]:
        """(source UID, destination UID) of the messages of an in-flight batch from *box* on *src* that
        the destination holds: all if it committed, none if not (its hashes were journaled before its
        last byte). A message found by content whose source is gone may be another client's own, moved
        there by it: taken for the batch's only if its content is elsewhere too (movefinish.unvouched)."""
        if "hashes" not in rec:
            return []  # the MULTIAPPEND's last byte was never sent: nothing can have been saved
        new = entry.data["pairs"][rec["pair"]][1]
        found = await find_copies(dst, new, rec["validity"], rec["uidnext"], rec["hashes"], clock=self.clock)
        uids = expand_uid_set(rec["src"])
        pairs = [(uids[i], uid) for i, uid in sorted(found.items())]
        if not pairs:
            return []
        present: set[int] = set()
        if await exists(src, box):
            if await same_mailbox(src, box, entry.data["validity"].get(str(rec["pair"])), readonly=True):
                present = set(await still_there(src, [s for s, _d in pairs]))  # else made anew: each one gone
            await src.deselect()
        sent = dict(zip(uids, rec["hashes"]))
        alone = set(await unvouched(self.mailbox_map, entry.user, src, box, dst, new, self.connect,
                                    [(s, d) for s, d in pairs if s not in present], sent,
                                    collections.Counter(sent[s] for s, _d in pairs)))
        return [p for p in pairs if p not in alone]

    # -- after the commit point: finish ------------------------------------------------------

    async def finish(self, entry: JournalEntry) -> None:
        """Recovery: finish a committed move on fresh connections; its drain waits seen_by_others from now."""
        self._began_at = self.clock.seconds() if self._began_at is None and self.clock is not None else self._began_at
        connect = self.mailbox_map.fences.guarding(self.connect, entry)  # (fencing.py)
        conns = [await connect(entry.data["src"])]
        try:
            conns.append(await connect(entry.data["dst"]))
            await self._finish(entry, *conns)
        finally:
            for conn in conns:
                conn.logout()

    async def _finish(self, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol) -> None:
        data = entry.data
        pairs = [tuple(p) for p in data["pairs"]]
        if entry.step is Step.COMMITTED:
            await carry_subscriptions(self.mailbox_map, self.user, src, dst, pairs)
            await self.mailbox_map.step(entry, Step.SUBSCRIBED)
        if entry.step is Step.SUBSCRIBED:
            for i, (o, n) in enumerate(pairs):  # an old name routed elsewhere unplaced: made there, never with its UIDVALIDITY
                if o not in (n, "INBOX"):
                    await returns_past(o, data["validity"].get(str(i)), data["src"],
                                       self.mailbox_map.rule_route(self.user, o).primary, self.connect)
            for o, n in pairs:
                await self.mailbox_map.place(self.user, n, [data["dst"]])
                if o not in (n, "INBOX") and normalize(o, self.sep) in self.mailbox_map.placements(self.user):
                    await self.mailbox_map.unplace(self.user, o)
            if data["src"] not in self.mailbox_map.home(self.user).backends:  # the home moved (`move carol inbox b2`
                await self.mailbox_map.watch_old_home(self.user, data["src"], self.clock)  # too), or see oldhome.py
            await self.mailbox_map.step(entry, Step.PLACED)
        await resume(self.mailbox_map, entry, src, dst, self._aside(data, "drop"))  # a removal a crash cut off
        for i in reversed(range(len(pairs))):
            if i not in data["drained"]:
                await self._drain(entry, i, src, dst)
        await self.mailbox_map.end_move(entry)

    async def _drain(self, entry: JournalEntry, i: int, src: BackendProtocol, dst: BackendProtocol) -> None:
        """Carry what reached source *i* during the move, expunge exactly the verified UIDs, delete it.

        First in place, until it is quiet (nothing uncopied, and no new UID for QUIET seconds);
        then (not INBOX) the source is renamed to a private name that no delivery reaches,
        emptied the same way, and deleted. The quiet matters: a delivery committing at the
        moment of the RENAME leaves its lock inside the renamed maildir, and Dovecot waits for
        it as long as the delivering process lives; so the private mailbox is only ever
        looked at within ASIDE_TIMEOUT seconds, else the move is left to recovery to retry."""
        data = entry.data
        old = data["pairs"][i][0]
        aside = self._aside(data, str(i))
        if i not in data["aside"]:
            if await exists(src, old):
                # the drain is the first change a session with the source selected could see (an EXPUNGE
                # of mail that is not gone): the other processes end those sessions first
                await seen_by_then(self.clock, self._began_at, self.seen_by_others)
                left = await self._empty_until_quiet(entry, i, src, dst, old)
                if old == "INBOX":
                    if left:
                        log.warn("move {id}: INBOX on {b} keeps receiving mail: {n} message(s) left there (if INBOX "
                                 "moved to {dst}, carried there later: oldhome.py)", id=entry.id, b=src.name,
                                 n=len(left), dst=data["dst"])
                    return await self._drained(entry, i)
                await seen_by_then(self.clock, self._began_at, self.seen_by_others)  # a source is set aside next
                await src.deselect()  # a mailbox selected on this connection cannot be renamed
                await self._set_aside(src, old, aside)
            elif old == "INBOX" or not await exists(src, aside):
                return await self._drained(entry, i)  # nothing left at the source
            data["aside"].append(i)
            data["at"] = i
            await self.mailbox_map.step(entry, Step.ASIDE)
        await self._bounded(src, self._delete_aside(entry, i, src, dst, aside))
        if old == data["pairs"][i][1]:  # moved, not renamed: the name is subscribed at its new backend now
            await src.command(b"UNSUBSCRIBE " + name_arg(old))
        await self._drained(entry, i)

    async def _set_aside(self, src: BackendProtocol, old: str, aside: str) -> None:
        """RENAME *old* (its children along) to *aside* in their turns (appendturns.MoverTurn.renaming)."""
        release = None
        if self.turn is not None:
            try:
                release = await self.turn.renaming(src.name, [old, *await subtree(src, old, self.sep)])
            except defer.TimeoutError:
                raise TransferError(f"an APPEND to {old} on {src.name} stayed under way; tried again later") from None
        try:
            quiet = await self.turn.quiet(src.name) if self.turn is not None else None  # renamehold.py
            try:
                await run_ok(src, b"RENAME " + name_arg(old) + b" " + name_arg(aside), "RENAME")
            finally:
                if quiet is not None:
                    quiet()
        finally:
            if release is not None:
                release()

    async def _delete_aside(self, entry: JournalEntry, i: int, src: BackendProtocol, dst: BackendProtocol,
                            aside: str) -> None:
        old = entry.data["pairs"][i][0]
        if await aside_gone(src, aside, old, self.sep):
            return  # deleted just before a crash (or half: Dovecot killed mid-DELETE)
        await drop_marks(src, aside)  # a crash cut hidden_messages() off: not the user's mail
        for _look in range(DRAIN_ROUNDS):
            if await self._empty(entry, i, src, dst, aside):
                return log.error("move {id}: mail kept arriving in {box} on {b}: left there as {aside}", id=entry.id,
                                 box=old, b=src.name, aside=aside)
            if await list_mailboxes(src, name_arg(aside + self.sep + "*")):
                return log.error("move {id}: mailboxes appeared under {box} during the move: kept on {b} under {aside}",
                                 id=entry.id, box=old, b=src.name, aside=aside)
            try:
                hidden = await hidden_messages(src, aside)  # seen empty: is it, read whole again?
            except NotReadAgain as e:
                return log.error("move {id}: {box} on {b} could not be read whole again ({why}): left there as {aside}",
                                 id=entry.id, box=old, b=src.name, why=str(e), aside=aside)
            if not hidden:
                break
            log.warn("move {id}: {n} message(s) of {box} on {b} out of Dovecot's sight until now", id=entry.id, n=hidden,
                     box=old, b=src.name)
        else:
            return log.error("move {id}: {box} on {b} kept showing unseen mail: left as {aside}", id=entry.id, box=old,
                             b=src.name, aside=aside)
        await run_ok(src, b"DELETE " + name_arg(aside), "DELETE")  # a private name, seen empty, read whole again

    async def _bounded(self, conn: BackendProtocol, work: Coroutine[Any, Any, None]) -> None:
        """*work*, given up after ASIDE_TIMEOUT s (with a clock): *conn* dropped, a TransferError for recovery."""
        d = defer.ensureDeferred(work)

        def given_up(_result: object, _timeout: float) -> None:
            conn.transport.abortConnection()
            raise TransferError(f"backend {conn.name} kept a moved mailbox locked (a delivery in flight at the "
                                "RENAME); it is tried again later")

        if self.clock is not None:
            d.addTimeout(ASIDE_TIMEOUT, self.clock, onTimeoutCancel=given_up)
        await d

    async def _empty_until_quiet(self, entry: JournalEntry, i: int, src: BackendProtocol, dst: BackendProtocol,
                                 box: str) -> list[int]:
        """_empty() until a round leaves nothing uncopied and no new UID shows for QUIET seconds, for
        at most QUIET_BUDGET seconds (INBOX: INBOX_QUIET_BUDGET). The UIDs left uncopied."""
        started = self.clock.seconds() if self.clock is not None else 0.0
        while True:
            left = await self._empty(entry, i, src, dst, box)
            if self.clock is None:
                return left
            if not left:
                before = await status(src, box)
                if before.uidnext == entry.data.get("uidnext", {}).get(str(i)):
                    return []  # nothing was delivered to it during the whole move
                await task.deferLater(self.clock, QUIET, lambda: None)
                if (await status(src, box)).uidnext == before.uidnext:
                    return []
            if self.clock.seconds() - started > (INBOX_QUIET_BUDGET if box == "INBOX" else QUIET_BUDGET):
                return left

    async def _empty(self, entry: JournalEntry, i: int, src: BackendProtocol, dst: BackendProtocol,
                     box: str) -> list[int]:
        """Rounds of: copy (and verify) what *box* holds that is not copied yet, expunge exactly the
        verified UIDs; until a round leaves nothing. The UIDs still left after the last round."""
        data = entry.data
        if data.get("pending") and data["pending"]["pair"] == i:
            await self._settle(entry, src, box, dst)
        left: list[int] = []
        for _round in range(DRAIN_ROUNDS):
            carried = await self._copy(entry, i, src, dst, box, delta=True)
            if carried:
                self.progress.carried += carried
                log.info("move {id}: carried {n} message(s) that reached {box} during the move", id=entry.id,
                         n=carried, box=data["pairs"][i][0])
            state = await open_mailbox(src, box, readonly=False)
            if state.uidvalidity != data["validity"].get(str(i), state.uidvalidity):
                raise TransferError("a source mailbox was replaced during the move (UIDVALIDITY changed)")
            present, _ = await search_uids(src, b"ALL")
            copied = copied_of(entry, i)  # removed, each told from a client's removal (drain.py)
            await self._in_turn(src.name, box, functools.partial(
                remove_verified, self.mailbox_map, entry, i, src, dst, box, self._aside(data, "drop"), present, copied))
            left = [u for u in present if u not in copied]
            await src.deselect()  # never CLOSE: it would expunge \Deleted mail that was not copied
            if not left:
                break
        return left

    async def _in_turn(self, backend: str, box: str, work: Callable[[], Awaitable[Any]]) -> None:
        release = await self.turn(backend, box) if self.turn is not None else (lambda: None)
        try:
            await work()
        finally:
            release()

    async def _drained(self, entry: JournalEntry, i: int) -> None:
        entry.data["drained"].append(i)
        await self.mailbox_map.step(entry, Step.DRAINED)

    async def _settle(self, entry: JournalEntry, src: BackendProtocol, box: str, dst: BackendProtocol) -> None:
        """A delta batch from *box* a crash interrupted: recorded if it committed (found by content), else dropped."""
        data, rec = entry.data, entry.data["pending"]
        found = await self._find_pending(entry, src, box, dst, rec)
        rec.pop("hashes", None)
        if found:  # what is there is recorded as copied; the rest is copied again
            rec["src"] = uid_set(s for s, _d in found).decode()
            rec["dst"] = uid_set(d for _s, d in found).decode()
            data["batches"].append(rec)
        data["pending"] = None
        await self.mailbox_map.step(entry, Step.DELTA_COPIED)
