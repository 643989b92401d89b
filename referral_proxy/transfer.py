"""Moving mail between backends without losing or duplicating a message.

Cross-server COPY / MOVE, RENAME to another backend, and the admin ``move``
command all come down to: fix the source UIDs, read FLAGS / INTERNALDATE / size,
then stream each ``BODY.PEEK[]`` literal straight into ONE MULTIAPPEND on the
destination (atomic there), on a connection of the transfer's own.

A mailbox move (RENAME, ``move``) is journaled in the map store step by step:

    planned -> creating:i / created:i -> copied:i ... -> copied  (commit point)
            -> subscribed -> placed -> deleted:i ... -> (journal entry removed)

Before ``copied`` a crash is rolled back (the destination copies are deleted:
the source was never touched); from ``copied`` on it is rolled forward (the
source is deleted once every message is verified on the destination). Either
way every message exists exactly once afterwards. ``recover`` does this for
entries a killed proxy left behind.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .append import uid_set
from .backend import BackendError, BackendProtocol, UntaggedResponse, wire_tail
from .imap.command import Atom, ParenList, ParseError, String, parse_arguments
from .imap.framing import Line, LiteralData, LiteralEnd
from .imap.quoting import astring
from .imap.response import ResponseStart, completion_text
from .routing import JournalEntry, MailboxMap, normalize

__all__ = [
    "TransferError",
    "MessageInfo",
    "fix_uids",
    "fetch_infos",
    "copy_stream",
    "expunge_uids",
    "expand_uid_set",
    "Mover",
    "Progress",
]

log = Logger()

BATCH_MESSAGES = 500  # messages per MULTIAPPEND when a whole mailbox moves
BATCH_BYTES = 256 * 1024 * 1024


class TransferError(BackendError):
    """The transfer stopped; str() is safe to show a client. Nothing was committed
    on the destination by the failing step."""


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    flags: tuple[bytes, ...]  # without \Recent
    internaldate: bytes
    size: int


@implementer(IPushProducer)
class _Pause:
    """The source's transport as the producer of the destination's: a slow destination pauses the source."""

    def __init__(self, transport: object) -> None:
        self._t = transport

    def pauseProducing(self) -> None:
        self._t.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if not getattr(self._t, "disconnected", False):
            self._t.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        # The destination is gone (Twisted calls this on its connectionLost): a pause
        # it held must not outlive it, or the source, and the client behind it, hang.
        self.resumeProducing()


def _fetch_items(resp: UntaggedResponse) -> dict[bytes, object]:
    fragments, literals = resp.arguments
    args = parse_arguments(fragments, literals)
    if not args or not isinstance(args[0], ParenList):
        raise ParseError("malformed FETCH response")
    items = args[0].items
    out: dict[bytes, object] = {}
    for i in range(0, len(items) - 1, 2):
        key = items[i]
        if isinstance(key, Atom):
            out[key.value.upper()] = items[i + 1]
    return out


def expand_uid_set(data: bytes) -> list[int]:
    """``b"5:7,9"`` -> ``[5, 6, 7, 9]``, in the order given (RFC 4315)."""
    out: list[int] = []
    for part in data.split(b","):
        if b":" in part:
            a, b = (int(x) for x in part.split(b":"))
            out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        elif part:
            out.append(int(part))
    return out


def _others(responses: Sequence[UntaggedResponse], name: str) -> list[bytes]:
    return [r.raw for r in responses if r.start.name != name]


async def _ok(conn: BackendProtocol, command: bytes, what: str):
    result = await conn.command(command)
    if not result.ok:
        raise TransferError(f"{what} failed on {conn.name}: {result.start.text.decode('utf-8', 'replace')}")
    return result


async def fix_uids(conn: BackendProtocol, message_set: bytes, uid: bool) -> tuple[list[int], list[bytes]]:
    """The UIDs a (UID) COPY set names now, ascending, so the set cannot shift meanwhile."""
    result = await conn.command((b"UID SEARCH UID " if uid else b"UID SEARCH ") + message_set)
    if not result.ok:
        raise TransferError(completion_text(result.start))
    uids: list[int] = []
    for r in result.responses:
        if r.start.name == "SEARCH":
            uids.extend(int(x) for x in r.start.rest.split() if x.isdigit())
    return sorted(set(uids)), _others(result.responses, "SEARCH")


async def fetch_infos(conn: BackendProtocol, uids: Sequence[int]) -> tuple[list[MessageInfo], list[bytes]]:
    """FLAGS, INTERNALDATE and size of each message, in UID order."""
    if not uids:
        return [], []
    result = await _ok(conn, b"UID FETCH " + uid_set(list(uids)) + b" (UID FLAGS INTERNALDATE RFC822.SIZE)", "FETCH")
    infos, others = {}, []
    for r in result.responses:
        if r.start.name != "FETCH":
            others.append(r.raw)
            continue
        try:
            items = _fetch_items(r)
            uid = int(items[b"UID"].value)  # type: ignore[union-attr]
            flags = tuple(t.value for t in items[b"FLAGS"].items  # type: ignore[union-attr]
                          if isinstance(t, Atom) and t.value.upper() != b"\\RECENT")
            date = items[b"INTERNALDATE"].value  # type: ignore[union-attr]
            size = int(items[b"RFC822.SIZE"].value)  # type: ignore[union-attr]
        except (KeyError, ParseError, ValueError, AttributeError):
            others.append(r.raw)  # an unsolicited flag update, say
            continue
        infos[uid] = MessageInfo(uid, flags, date, size)
    missing = [u for u in uids if u not in infos]
    if missing:
        raise TransferError(f"message UID {missing[0]} vanished from the source")
    return [infos[u] for u in uids], others


@dataclass
class Progress:
    """Counts for progress reports: called after each message."""

    messages: int = 0
    bytes: int = 0
    on_message: Callable[[Progress], None] | None = None

    def add(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        if self.on_message is not None:
            self.on_message(self)


async def copy_stream(src: BackendProtocol, infos: Sequence[MessageInfo], dst: BackendProtocol,
                      mailbox: bytes, progress: Progress | None = None) -> tuple[int, list[int], list[bytes]]:
    """Append *infos*' messages to *mailbox* on *dst* in ONE MULTIAPPEND, bodies streamed
    from *src* by one ``UID FETCH``. Returns (uidvalidity, destination UIDs in order, other
    untagged responses *src* sent meanwhile, raw, to relay). On any failure the destination
    connection is aborted, so its MULTIAPPEND saves nothing."""
    if not infos:
        raise TransferError("nothing to copy")
    if "MULTIAPPEND" not in dst.capabilities or "LITERAL+" not in dst.capabilities:
        raise TransferError(f"backend {dst.name} cannot take several messages atomically (no MULTIAPPEND/LITERAL+)")
    ptag = dst.next_tag()
    done: defer.Deferred[tuple[ResponseStart, bytes]] = defer.Deferred()
    dst.expect(ptag, lambda start, raw: done.callback((start, raw)))
    dst.transport.registerProducer(_Pause(src.transport), True)
    try:
        dst.write(ptag + b" APPEND " + astring(mailbox))
        others = await _stream_bodies(src, infos, dst, progress)
        dst.write(b"\r\n")
        start, raw = await done
    except BaseException:
        dst.transport.abortConnection()
        raise
    finally:
        if not dst.closed:
            dst.transport.unregisterProducer()
    if start.tag is None:
        raise TransferError(f"backend {dst.name} closed the connection")
    if start.status != "OK":
        raise TransferError(completion_text(start))
    if start.code != "APPENDUID":
        raise TransferError(f"backend {dst.name} gave no APPENDUID")
    validity, _, uids = start.code_args.partition(b" ")
    dest = expand_uid_set(uids)
    if len(dest) != len(infos):
        raise TransferError(f"backend {dst.name} reported {len(dest)} new messages for {len(infos)}")
    return int(validity), dest, others


_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)


async def _stream_bodies(src: BackendProtocol, infos: Sequence[MessageInfo], dst: BackendProtocol,
                         progress: Progress | None) -> list[bytes]:
    """Every BODY.PEEK[] literal goes to *dst* chunk by chunk as it arrives, in UID order,
    each behind its flags and date. Anything else *src* says is kept, raw, for the client."""
    expected = list(infos)
    state: dict = {"next": 0, "body": None, "error": None, "other": None}
    others: list[bytes] = []

    def tap(start: ResponseStart | None, event: object) -> None:
        if start is not None:
            assert isinstance(event, Line)
            if (start.name == "FETCH" and event.literal is not None
                    and event.data.rstrip().upper().endswith(b"BODY[]") and state["error"] is None):
                info = expected[state["next"]] if state["next"] < len(expected) else None
                m = _UID.search(event.data)
                if info is None or (m is not None and int(m.group(1)) != info.uid):
                    state["error"] = f"unexpected message {m.group(1).decode() if m else '?'} from {src.name}"
                    return
                state["next"] += 1
                state["body"] = info
                flags = b"(" + b" ".join(info.flags) + b")"
                dst.write(b" %s \"%s\" {%d+}\r\n" % (flags, info.internaldate, event.literal.size))
                return
            state["other"] = [event.data + wire_tail(event)]  # not ours: for the client
            if event.literal is None:
                others.append(b"".join(state.pop("other")))
            return
        if isinstance(event, LiteralData):
            if state["body"] is not None:
                dst.write(event.data)
            elif state.get("other") is not None:
                state["other"].append(event.data)
        elif isinstance(event, LiteralEnd):
            if state["body"] is not None and progress is not None:
                progress.add(state["body"].size)
            state["body"] = None
        elif isinstance(event, Line) and state.get("other") is not None:
            state["other"].append(event.data + wire_tail(event))
            if event.literal is None:
                others.append(b"".join(state.pop("other")))

    src.tap = tap
    try:
        result = await src.command(b"UID FETCH " + uid_set([i.uid for i in infos]) + b" (UID BODY.PEEK[])")
    finally:
        src.tap = None
    if state["error"] is not None:
        raise TransferError(state["error"])
    if not result.ok or state["next"] != len(expected):
        missing = expected[state["next"]].uid if state["next"] < len(expected) else "?"
        raise TransferError(f"message UID {missing} could not be read from {src.name}")
    return others


async def expunge_uids(conn: BackendProtocol, uids: Sequence[int]) -> list[bytes]:
    """Remove exactly these messages (never a plain EXPUNGE); the EXPUNGE responses, raw."""
    uids_b = uid_set(sorted(uids))
    stored = await _ok(conn, b"UID STORE " + uids_b + b" +FLAGS.SILENT (\\Deleted)", "STORE")
    expunged = await _ok(conn, b"UID EXPUNGE " + uids_b, "UID EXPUNGE")
    return [r.raw for r in stored.responses] + [r.raw for r in expunged.responses]


# -- whole mailboxes: RENAME to another backend, the admin "move" ------------------------------


Connect = Callable[[str], Awaitable[BackendProtocol]]


@dataclass
class MoveResult:
    mailboxes: int = 0
    messages: int = 0
    bytes: int = 0


def _fault(step: str) -> None:
    """Fault injection for tests: REFERRAL_PROXY_FAULT=journal:<step> kills the process there."""
    spec = os.environ.get("REFERRAL_PROXY_FAULT", "")
    if spec.startswith("journal:") and step == spec[len("journal:"):]:
        log.warn("fault injection: killed at journal step {step}", step=step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Mover:
    """Moves mailboxes of one user between backends, journaled so a crash can be recovered."""

    mailbox_map: MailboxMap
    connect: Connect  # a NEW authenticated connection to a backend, as the user
    user: str
    progress: Progress = field(default_factory=Progress)

    def _journal(self, entry: JournalEntry, step: str) -> None:
        entry.step = step
        self.mailbox_map.store.journal_step(entry.id, step, entry.data)
        self.mailbox_map.journal_changed()
        _fault(step)

    async def plan(self, src: BackendProtocol, old: str, new: str) -> list[tuple[str, str]]:
        """(old, new) names of the mailbox and its children that *src* owns, parents first.

        ``old == new == "*"``: every mailbox of the user that *src* owns (a whole user)."""
        sep = self.mailbox_map.separator
        if old == new == "*":
            patterns = ["*"]
        elif normalize(old, sep) == "INBOX":
            return [("INBOX", new)]  # RFC 3501: INBOX's messages move, its children do not
        else:
            patterns = [old, old + sep + "*"]
        pairs = []
        for pattern in patterns:
            result = await _ok(src, b'LIST "" ' + astring(pattern.encode("utf-8", "surrogateescape")), "LIST")
            for r in result.responses:
                if r.start.name != "LIST":
                    continue
                fragments, literals = r.arguments
                args = parse_arguments(fragments, literals)
                flags = {t.value.upper() for t in args[0].items if isinstance(t, Atom)}  # type: ignore[union-attr]
                name = args[2].value.decode("utf-8", "surrogateescape")  # type: ignore[union-attr]
                if b"\\NOSELECT" in flags or b"\\NONEXISTENT" in flags:
                    continue
                if self.mailbox_map.lookup(self.user, name).primary != src.name:
                    continue  # a child placed elsewhere stays where it is
                if old == "*":
                    name = normalize(name, sep)
                    pairs.append((name, name))
                else:
                    pairs.append((name, new + name[len(old):]))
        pairs.sort(key=lambda p: (p[0] != "INBOX", p[0].count(sep)))
        return pairs

    async def rename(self, old: str, new: str, src_name: str, dst_name: str) -> MoveResult:
        """Move *old* (and its children) on *src_name* to *new* on *dst_name*."""
        src = await self.connect(src_name)
        dst = await self.connect(dst_name)
        try:
            pairs = await self.plan(src, old, new)
            if not pairs:
                raise TransferError(f"[NONEXISTENT] Mailbox doesn't exist: {old}")
            for _o, n in pairs:
                if normalize(n, self.mailbox_map.separator) == "INBOX" and _o != "INBOX":
                    raise TransferError("[CANNOT] Cannot rename a mailbox to INBOX")
                if n != "INBOX" and await _exists(dst, n):
                    raise TransferError(f"[ALREADYEXISTS] Mailbox already exists: {n}")
            # Every moved name gets a placement; mailboxes created later still follow the rules.
            data = {"pairs": pairs, "src": src_name, "dst": dst_name, "created": [], "copied": [], "deleted": []}
            entry = JournalEntry(self.mailbox_map.store.journal_begin(self.user, "rename", data), self.user,
                                 "rename", data, "planned")
            self.mailbox_map.journal_changed()
            _fault("planned")
            result = MoveResult()
            try:
                for i, (o, n) in enumerate(pairs):
                    if n != "INBOX":
                        data["created"].append(n)  # recorded BEFORE it exists: a crash between is rolled back
                        self._journal(entry, f"creating:{i}")
                        await _ok(dst, b"CREATE " + astring(n.encode("utf-8", "surrogateescape")), "CREATE")
                        self._journal(entry, f"created:{i}")
                    copied = await self._copy_mailbox(src, o, dst, n)
                    data["copied"].append({"old": o, "uids": uid_set(copied).decode() if copied else ""})
                    result.messages += len(copied)
                    self._journal(entry, f"copied:{i}")
                self._journal(entry, "copied")  # the commit point: every message is on dst, verified
            except BaseException:
                await self._roll_back(entry)
                raise
            await self._finish(entry, src, dst)
            result.mailboxes = len(pairs)
            result.bytes = self.progress.bytes
            return result
        finally:
            src.logout()
            dst.logout()

    async def _copy_mailbox(self, src: BackendProtocol, old: str, dst: BackendProtocol, new: str,
                            after_uid: int = 0) -> list[int]:
        """Every message of *old* (UID > after_uid) into *new*, in bounded batches, then verified."""
        old_b, new_b = old.encode("utf-8", "surrogateescape"), new.encode("utf-8", "surrogateescape")
        await _ok(src, b"EXAMINE " + astring(old_b), "EXAMINE")
        uids, _ = await fix_uids(src, b"%d:*" % (after_uid + 1), uid=True)
        uids = [u for u in uids if u > after_uid]
        infos, _ = await fetch_infos(src, uids)
        batch: list[MessageInfo] = []
        size = 0
        for info in infos:
            batch.append(info)
            size += info.size
            if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
                await copy_stream(src, batch, dst, new_b, self.progress)
                batch, size = [], 0
        if batch:
            await copy_stream(src, batch, dst, new_b, self.progress)  # (the mover's own connections: nothing to relay)
        if after_uid == 0:
            await self._verify(dst, new_b, infos)
        return uids

    async def _verify(self, dst: BackendProtocol, mailbox: bytes, infos: Sequence[MessageInfo]) -> None:
        """Count and total size on the destination must match the source before anything is deleted."""
        await _ok(dst, b"EXAMINE " + astring(mailbox), "EXAMINE")
        result = await _ok(dst, b"FETCH 1:* (RFC822.SIZE)", "FETCH") if infos else None
        sizes = []
        for r in (result.responses if result else ()):
            if r.start.name == "FETCH":
                try:
                    sizes.append(int(_fetch_items(r)[b"RFC822.SIZE"].value))  # type: ignore[union-attr]
                except (KeyError, ParseError, ValueError, AttributeError):
                    pass
        want = (len(infos), sum(i.size for i in infos))
        if (len(sizes), sum(sizes)) != want:
            raise TransferError(f"verification failed for {mailbox.decode('utf-8', 'replace')}: "
                                f"{len(sizes)} messages / {sum(sizes)} bytes on {dst.name}, expected {want[0]} / {want[1]}")
        await dst.deselect()

    async def _roll_back(self, entry: JournalEntry) -> None:
        """Before the commit point: delete what was created on the destination (children first).

        On a connection of its own: the transfer's may have been aborted mid-append."""
        data = entry.data
        dst = await self.connect(data["dst"])
        try:
            for name in reversed(data["created"]):
                if await _exists(dst, name):
                    await _ok(dst, b"DELETE " + astring(name.encode("utf-8", "surrogateescape")), "DELETE")
        finally:
            dst.logout()
        self.mailbox_map.store.journal_end(entry.id)
        self.mailbox_map.journal_changed()
        log.info("move of {pairs} rolled back", pairs=data["pairs"])

    async def _finish(self, entry: JournalEntry, src: BackendProtocol | None, dst: BackendProtocol | None) -> None:
        """From the commit point on: subscriptions, placements, then the sources go (children first)."""
        data = entry.data
        opened = []
        if src is None or src.closed:
            src = await self.connect(data["src"])
            opened.append(src)
        if dst is None or dst.closed:
            dst = await self.connect(data["dst"])
            opened.append(dst)
        try:
            await self._finish_steps(entry, src, dst)
        finally:
            for conn in opened:
                conn.logout()

    async def _finish_steps(self, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol) -> None:
        data = entry.data
        pairs = [tuple(p) for p in data["pairs"]]
        copied = {c["old"]: expand_uid_set(c["uids"].encode()) for c in data["copied"]}
        if entry.step in ("copied",):
            subscribed = await _subscribed(src)
            for o, n in pairs:
                if o in subscribed:
                    await _ok(dst, b"SUBSCRIBE " + astring(n.encode("utf-8", "surrogateescape")), "SUBSCRIBE")
            self._journal(entry, "subscribed")
        if entry.step in ("subscribed",):
            for o, n in pairs:
                self.mailbox_map.place(self.user, n, [data["dst"]])
                if o != n and o in self.mailbox_map.placements(self.user):
                    self.mailbox_map.unplace(self.user, o)
            self._journal(entry, "placed")
        for i in reversed(range(len(pairs))):
            o, n = pairs[i]
            if o in data["deleted"]:
                continue
            if await _exists(src, o):
                await self._empty_source(entry, i, src, dst, o, n, copied)
            data["deleted"].append(o)
            self._journal(entry, f"deleted:{i}")
        self.mailbox_map.store.journal_end(entry.id)
        self.mailbox_map.journal_changed()

    async def _empty_source(self, entry: JournalEntry, i: int, src: BackendProtocol, dst: BackendProtocol,
                            old: str, new: str, copied: dict[str, list[int]]) -> None:
        """Remove *old* from the source without ever dropping a message that was not copied.

        Mail delivered to the source meanwhile (LMTP, Sieve) goes along first; the
        copied UIDs are expunged by UID, and only an empty mailbox is deleted (INBOX
        stays). Each delta is journaled before anything is removed, so a second
        recovery never copies it again."""
        data = entry.data
        old_b = old.encode("utf-8", "surrogateescape")
        for _attempt in range(10):
            last = max(copied.get(old) or [0])
            delta = await self._copy_mailbox(src, old, dst, new, after_uid=last)
            if delta:
                copied[old] = (copied.get(old) or []) + delta
                for c in data["copied"]:
                    if c["old"] == old:
                        c["uids"] = uid_set(copied[old]).decode()
                self._journal(entry, f"delta:{i}")
                log.info("moved {n} message(s) that arrived in {box} during the move", n=len(delta), box=old)
            await _ok(src, b"SELECT " + astring(old_b), "SELECT")
            left = -1
            if "UIDPLUS" in src.capabilities and copied.get(old):
                await expunge_uids(src, copied[old])
                status = await _ok(src, b"UID SEARCH ALL", "SEARCH")
                left = sum(len(r.start.rest.split()) for r in status.responses if r.start.name == "SEARCH")
            await src.deselect()  # never CLOSE: it would expunge \Deleted mail that was not copied
            if left <= 0:
                break
            # Something arrived after the last copy: take it along, then try again.
        else:
            log.error("{box} on {b} keeps receiving mail: {n} message(s) left there", box=old, b=src.name, n=left)
            return
        if old != "INBOX":
            await src.command(b"UNSUBSCRIBE " + astring(old_b))
            await _ok(src, b"DELETE " + astring(old_b), "DELETE")

    async def recover(self, entry: JournalEntry) -> str:
        """Finish (after the commit point) or roll back (before it) a move a crash interrupted."""
        if entry.step == "planned" or entry.step.startswith(("creating:", "created:", "copied:")):
            await self._roll_back(entry)
            return "rolled back"
        await self._finish(entry, None, None)
        return "finished"


async def _exists(conn: BackendProtocol, name: str) -> bool:
    result = await _ok(conn, b'LIST "" ' + astring(name.encode("utf-8", "surrogateescape")), "LIST")
    return any(r.start.name == "LIST" for r in result.responses)


async def _subscribed(conn: BackendProtocol) -> set[str]:
    result = await _ok(conn, b'LSUB "" "*"', "LSUB")
    names = set()
    for r in result.responses:
        if r.start.name == "LSUB":
            fragments, literals = r.arguments
            try:
                args = parse_arguments(fragments, literals)
                if isinstance(args[2], (Atom, String)):
                    names.add(args[2].value.decode("utf-8", "surrogateescape"))
            except (ParseError, IndexError):
                continue
    return names


@dataclass
class CopyOutcome:
    """What a cross-server COPY / MOVE answers: untagged lines to relay, then the completion."""

    untagged: list[bytes]
    status: str
    text: str
    bytes: int = 0  # message bytes carried to the destination


async def copy_across(src: BackendProtocol, message_set: bytes, uid: bool, dst: BackendProtocol,
                      mailbox: bytes, move: bool) -> CopyOutcome:
    """COPY / MOVE from the mailbox selected on *src* to *mailbox* on *dst* (a connection of its own).

    MOVE removes the source messages only after the destination has committed, by
    UID; if that fails the copies stay and the source flags are restored: the
    messages are then in both places (duplicated at worst, never lost).
    """
    if move and "UIDPLUS" not in src.capabilities:
        return CopyOutcome([], "NO", f"[CANNOT] Backend {src.name} has no UIDPLUS: it cannot remove exactly the moved messages")
    uids, untagged = await fix_uids(src, message_set, uid)
    if not uids:
        return CopyOutcome(untagged, "OK" if uid else "NO", "No messages matched" if uid else "No such messages")
    if not await _exists(dst, mailbox.decode("utf-8", "surrogateescape")):
        return CopyOutcome(untagged, "NO", "[TRYCREATE] Mailbox doesn't exist: " + mailbox.decode("utf-8", "replace"))
    infos, others = await fetch_infos(src, uids)
    untagged += others
    validity, dest, during = await copy_stream(src, infos, dst, mailbox)
    untagged += during
    copyuid = f"[COPYUID {validity} {uid_set(uids).decode()} {uid_set(dest).decode()}]"
    size = sum(i.size for i in infos)
    if not move:
        return CopyOutcome(untagged, "OK", copyuid + " Copy completed.", size)
    untagged.append(b"* OK " + copyuid.encode() + b" Moved\r\n")  # RFC 6851: before the EXPUNGEs
    try:
        untagged += await expunge_uids(src, uids)
    except BackendError as e:
        not_deleted = [i.uid for i in infos if b"\\DELETED" not in {f.upper() for f in i.flags}]
        if not_deleted and not src.closed:
            await src.command(b"UID STORE " + uid_set(not_deleted) + b" -FLAGS.SILENT (\\Deleted)")
        log.error("MOVE: copied to {dst} but not removed from {src}: {why}", dst=dst.name, src=src.name, why=str(e))
        return CopyOutcome(untagged, "NO", f"{copyuid} The messages were copied but could not be removed from the "
                                           "source mailbox: they are now in both", size)
    return CopyOutcome(untagged, "OK", "Move completed.", size)
