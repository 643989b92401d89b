"""The mailbox map: which backend(s) own a user's mailbox, and the moves that hold names.

Order of authority: a placement written at run time (a moved mailbox) > the first matching ``[[map.rules]]``
entry > ``[map].default``. Placements, the move journal and its reservations live in a store (store.py, pgstore.py;
open_store below) mirrored in memory, so a lookup never waits on I/O; writes are coroutines. User names are canonical
(``[map].username_format``) everywhere in MailboxMap: routing, placements, reservations and the journal agree."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from .config import MapConfig
from .fencing import Fences
from .journal import (
    JournalEntry,
    LostEntry,
    Reservation,
    Step,
    check_transition,
    conflicts,
    covers,
    owner_gone,
    process_owner,
)
from .listmatch import unicode_name, wildcard_match
from .store import MapStore, MemoryStore, Snapshot, SQLiteStore

__all__ = ["Route", "MailboxMap", "MapStore", "SQLiteStore", "MemoryStore", "pattern_matches",
           "normalize", "rule_form", "canonical_user", "StepHook", "OLD_HOME_PREFIX", "OLD_HOME_WATCH", "OldHome"]

log = Logger()


@dataclass(frozen=True)
class Route:
    """Backends holding a mailbox, in preference order (replicas after the primary)."""

    backends: tuple[str, ...]

    @property
    def primary(self) -> str:
        return self.backends[0]


def normalize(mailbox: str, separator: str = "/") -> str:
    """INBOX is case-insensitive (RFC 3501 5.1), in ASCII ("\u0131nbox".upper() is "INBOX" in
    Python, not in IMAP: Dovecot refuses that name); every other name is compared as sent."""
    head, sep, tail = mailbox.partition(separator)
    if head.upper() == "INBOX" and head.isascii():
        return "INBOX" + sep + tail
    return mailbox


def rule_form(name: str) -> str:
    """A name (or a rule's pattern) as it meets the map's rules: in Unicode. Rules are written in
    UTF-8 in the TOML (or in modified UTF-7); clients send modified UTF-7, or UTF-8 once they
    enabled UTF8=ACCEPT (RFC 6855). Compared as sent, a rule "Café/*" took a UTF-8 client's
    "Café/x" to its backend and a modified UTF-7 client's "Caf&AOk-/x", the same mailbox, to the
    default one. A name that is not valid modified UTF-7 ("R&D", raw 8-bit) is taken as it is
    (listmatch.unicode_name, which LIST matching uses: one reading of a name everywhere)."""
    if "&" not in name:  # (every lookup comes here: no encoding for the names that cannot change)
        return name
    return unicode_name(name.encode("utf-8", "surrogateescape"))


def pattern_matches(pattern: str, mailbox: str, separator: str = "/") -> bool:
    """LIST-style match: ``*`` matches anything, ``%`` anything but the separator (no backtracking:
    ``*a*a*a*a*a*a*a*b`` against forty "a"s took 1.8 s with the regex this replaced, 7 wildcards)."""
    return wildcard_match(normalize(pattern, separator), normalize(mailbox, separator), separator)


def _may_match_under(pattern: str, prefix: str) -> bool:
    """May the LIST-style *pattern* match some name beginning with *prefix*? (Its text before
    the first wildcard and *prefix* agree; without a wildcard, it begins with *prefix*.)"""
    cut = min((i for i in (pattern.find("*"), pattern.find("%")) if i >= 0), default=-1)
    return pattern.startswith(prefix) if cut < 0 else (pattern[:cut].startswith(prefix) or prefix.startswith(pattern[:cut]))


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def canonical_user(user: str, username_format: str = "lower") -> str:
    """The map's name for a login name: ``"lower"`` lower-cases ASCII letters only, as Dovecot's
    ``%Lu`` does (so ``BOB`` is ``bob`` everywhere); ``"as-is"`` keeps it (``%u``)."""
    if username_format != "lower":
        return user
    return user.lower() if user.isascii() else user.translate(_ASCII_LOWER)  # the same; lower() is faster


StepHook = Callable[[JournalEntry], None]


# A private name (staging.is_private_name: under the aside prefix), never a client's mailbox: placed
# with the backend whose INBOX a move took elsewhere, until a time (oldhome.py)
_ASIDE = "referral-proxy-aside-"  # staging.ASIDE_PREFIX: a mailbox move reserves such a name (mover.py)
OLD_HOME_PREFIX = _ASIDE + "oldhome/"
LEASE_MARGIN = 0.5  # a write that took longer than this share of the lease may have lost it (record_before_commit)
MOVES_KEPT = 256  # journal entries remembered as begun, per process (relocation.py looks once a second)
BACKENDS_KEPT = 10_000  # users whose backends_for is kept at once (cleared whole past it)
OLD_HOME_WATCH = 3 * 24 * 3600  # seconds mail reaching an old home is carried (a weekend, and some)


@dataclass(frozen=True)
class OldHome:
    """A backend whose INBOX of *user* a move took elsewhere: mail reaching it is carried until *until*."""

    user: str
    backend: str
    until: int  # seconds since the epoch
    record: str  # the record's name in the map (a private placement)


class MailboxMap:
    """lookup(user, mailbox) -> Route, from placements, rules and the default; and the moves' entries. Lookups
    read the in-memory snapshot (the store's newest, polled without I/O); a write goes to the store, then to it."""

    def __init__(self, config: MapConfig, store: MapStore | None = None, *, on_step: StepHook | None = None) -> None:
        self.separator = config.separator
        self._store: MapStore = store if store is not None else MemoryStore()
        self.on_step = on_step  # called after each journal write (tests inject faults here)
        self.on_given_up: Callable[[], None] | None = None  # an entry disowned (recovery.RecoverySweep: soon)
        self._placements: dict[tuple[str, str], tuple[str, ...]] = {}
        # the same, by user: a LIST asks for one user's placements, which must not cost a walk of all
        # users' (a fleet after a migration holds hundreds of thousands)
        self._by_user: dict[str, dict[str, tuple[str, ...]]] = {}
        self._changes = 0
        self._backends_known: dict[str, tuple[str, ...]] = {}  # backends_for, by user name as asked
        self._backends_seen = -1  # the count of changes _backends_known was made at
        self._held: dict[str, list[tuple[int, Reservation]]] = {}
        # entries as first seen here, (number from 1, user, reservations): relocation.py ends the sessions
        # a mailbox move takes a selected mailbox from, whether or not the move is still on when it looks
        self._began: collections.deque[tuple[int, str, tuple[Reservation, ...]]] = collections.deque(maxlen=MOVES_KEPT)
        self._began_count = 0
        self.on_move_begun: Callable[[], None] | None = None  # relocation.py looks at the sessions at once
        self._renewal: task.LoopingCall | None = None
        self._working: set[int] = set()  # entries this process works on now: the only leases it renews
        # entries this process gave up on that the store did not let it disown (locked, unreachable):
        # still under its name, yet nobody works on them; recovered here once the store is back
        self._given_up: set[int] = set()
        self.fences = Fences(self._store, lambda: self.owner)  # when each lease was last renewed (fencing.py)
        first = self._store.poll()
        if first is not None:
            self._apply(first)
        self.reconfigure(config)

    def start(self) -> None:
        """Before serving (blocking): the store connects and checks itself, and is read whole."""
        self._store.start()
        self._refresh()

    async def open(self) -> None:
        """Read everything from the store again (a PostgreSQL store: also checks its schema)."""
        self._apply(await self._store.load())

    def reconfigure(self, config: MapConfig) -> None:
        """Swap in new rules (SIGHUP); placements are kept. New rules are a change: relocation.py ends the sessions
        they take a home or selected mailbox from (probe r2: its STORE/EXPUNGE were NO [INUSE] for good)."""
        if (old := getattr(self, "_config", None)) is not None and (old.rules, old.default) != (config.rules, config.default):
            self._changes += 1
        self._backends_seen = -1
        self._config = config
        self._default = Route((config.default,))  # one value, shared by every lookup the rules leave to it
        self._rules = [(None if r.user is None else canonical_user(r.user, config.username_format),
                        dataclasses.replace(r, mailbox=normalize(rule_form(r.mailbox), config.separator)))
                       for r in config.rules]  # (each pattern as _rule_route meets it: worked out once)

    def canonical(self, user: str) -> str:
        return canonical_user(user, self._config.username_format)

    def login_user(self, login: str) -> str:
        """The user a login name logs in as: ``bob*admin`` is bob with ``master_user_separator = "*"`` (a Dovecot
        master user's login; the backend checks it), routed, held and logged as bob."""
        separator = self._config.master_user_separator
        return self.canonical(login.partition(separator)[0] if separator and separator in login else login)

    @property
    def changes(self) -> int:
        """A count of the placements' changes seen (the store's, picked up now, and this process's own)."""
        self._refresh()
        return self._changes

    def _apply(self, snapshot: Snapshot) -> None:
        if snapshot.placements != self._placements:
            self._changes += 1
            self._placements = dict(snapshot.placements)
            self._by_user = {}
            for (u, m), backends in self._placements.items():
                self._by_user.setdefault(u, {})[m] = backends
        held: dict[str, list[tuple[int, Reservation]]] = {}
        for entry_id, user, r in snapshot.reservations:
            held.setdefault(user, []).append((entry_id, r))
        known = {i for entries in self._held.values() for i, _r in entries}
        for user, entries in held.items():
            for entry_id in dict.fromkeys(i for i, _r in entries if i not in known):
                self._began_entry(user, tuple(r for i, r in entries if i == entry_id))
        self._held = held

    def _began_entry(self, user: str, reservations: tuple[Reservation, ...]) -> None:
        self._began_count += 1
        self._began.append((self._began_count, user, reservations))
        if self.on_move_begun is not None:
            self.on_move_begun()

    @property
    def moves_begun(self) -> int:
        """How many journal entries this process saw begin (a session's SELECT notes it: relocation.py)."""
        return self._began_count

    def moves_since(self, seen: int) -> tuple[int, list[tuple[int, str, tuple[Reservation, ...]]]]:
        """(count, [(number, user, reservations)]): the entries this process saw begin since it had
        seen *seen* (at most MOVES_KEPT of them; numbered from 1), and the count to pass next time."""
        self._refresh()
        return self._began_count, [began for began in self._began if began[0] > seen]

    def _refresh(self) -> None:
        """Pick up placements and reservations written by another process (never waits)."""
        if (snapshot := self._store.poll()) is not None:
            self._apply(snapshot)

    @property
    def store(self) -> MapStore:
        return self._store

    @property
    def available(self) -> bool:
        """False while the store is unreachable: routing goes on from the snapshot, no name is made (mailboxes.UNMADE)."""
        return bool(getattr(self._store, "available", True))

    @property
    def owner(self) -> str:
        return process_owner()  # (never kept from before a fork: twistd's daemon is another process)

    # -- routing --------------------------------------------------------------------

    def lookup(self, user: str, mailbox: str) -> Route:
        self._refresh()
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        placed = self._placements.get((user, mailbox))
        return Route(placed) if placed else self._rule_route(user, mailbox)

    async def lookup_now(self, user: str, mailbox: str) -> Route:
        """:meth:`lookup` from the store, not the cache a poll filled (another proxy's move just ended)."""
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        placed = await self._store.placement(user, mailbox)
        return Route(placed) if placed else self._rule_route(user, mailbox)

    def router(self, user: str) -> Callable[[str], str]:
        """*user*'s names to their primary backend, for the many names of one answer (a merged LIST):
        the store polled once, each name worked out once (a lookup per name polled SQLite each time
        and matched every rule again: most of a 3,000-mailbox LIST's 0.1 s of the event loop)."""
        self._refresh()
        user = self.canonical(user)
        placements, sep, memo = self._placements, self.separator, {}

        def primary(mailbox: str) -> str:
            found = memo.get(mailbox)
            if found is None:
                name = normalize(mailbox, sep)
                placed = placements.get((user, name))
                found = memo[mailbox] = placed[0] if placed else self._rule_route(user, name).primary
            return found

        return primary

    def rule_route(self, user: str, mailbox: str) -> Route:
        """Where the rules and the default (not the placements) send a mailbox."""
        return self._rule_route(self.canonical(user), normalize(mailbox, self.separator))

    def _rule_route(self, user: str, mailbox: str) -> Route:
        """rule_route of a canonical user name and a normalized mailbox name."""
        sep = self.separator
        mailbox = normalize(rule_form(mailbox), sep)  # (pattern_matches' forms, each worked out once)
        for rule_user, rule in self._rules:
            if rule_user is not None and rule_user != user:
                continue
            if rule.mailbox == "*" or wildcard_match(rule.mailbox, mailbox, sep):
                return Route(rule.backends)
        return self._default

    def backends_for(self, user: str) -> list[str]:
        """Primary backends that may own any of *user*'s mailboxes, home first (every LIST asks:
        kept per user name until the placements or the rules change)."""
        self._refresh()
        if self._backends_seen != self._changes:
            self._backends_seen, self._backends_known = self._changes, {}
        found = self._backends_known.get(user)
        if found is None:
            if len(self._backends_known) >= BACKENDS_KEPT:
                self._backends_known.clear()
            found = self._backends_known[user] = self._backends_for(self.canonical(user))
        return list(found)

    def _backends_for(self, user: str) -> tuple[str, ...]:
        found = [self.home(user).primary]
        for m, backends in self._by_user.get(user, {}).items():
            if not m.startswith(OLD_HOME_PREFIX):
                found.append(backends[0])
        reaches_default = True
        for rule_user, rule in self._rules:
            if rule_user is not None and rule_user != user:
                continue
            found.append(rule.backends[0])
            if rule.mailbox == "*":  # catches everything: later rules and the default are unreachable
                reaches_default = False
                break
        if reaches_default:
            found.append(self._config.default)
        return tuple(dict.fromkeys(found))

    def backends_under(self, user: str, mailbox: str) -> list[str]:
        """Primary backends that may own a mailbox inside *mailbox* (``mailbox/...``): those of the
        placements there, of the rules whose pattern may match such a name, and the default if
        no earlier catch-all rule hides it. Over-approximated: a backend listed may own none."""
        self._refresh()
        user = self.canonical(user)
        prefix = normalize(mailbox, self.separator) + self.separator
        found = [b[0] for m, b in self._by_user.get(user, {}).items() if m.startswith(prefix)]
        prefix = rule_form(prefix)  # placements are names as sent; rules meet names in Unicode
        for rule_user, rule in self._rules:
            if rule_user is not None and rule_user != user:
                continue
            if _may_match_under(normalize(rule.mailbox, self.separator), prefix):
                found.append(rule.backends[0])
            if rule.mailbox == "*":
                break  # catches everything: later rules and the default are unreachable
        else:
            found.append(self._config.default)
        return list(dict.fromkeys(found))

    def home(self, user: str) -> Route:
        """The user's home is the route of INBOX."""
        return self.lookup(user, "INBOX")

    async def place(self, user: str, mailbox: str, backends: Iterable[str]) -> None:
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        backends = tuple(backends)
        await self._store.set(user, mailbox, backends)
        self._placements[(user, mailbox)] = backends
        self._by_user.setdefault(user, {})[mailbox] = backends
        self._changes += 1

    async def unplace(self, user: str, mailbox: str) -> None:
        user, mailbox = self.canonical(user), normalize(mailbox, self.separator)
        await self._store.unset(user, mailbox)
        self._placements.pop((user, mailbox), None)
        mine = self._by_user.get(user)
        if mine is not None:
            mine.pop(mailbox, None)
            if not mine:
                del self._by_user[user]
        self._changes += 1

    def placements(self, user: str) -> dict[str, tuple[str, ...]]:
        """*user*'s mailboxes placed by name (not the old homes' records: :meth:`old_homes`)."""
        self._refresh()
        user = self.canonical(user)
        return {m: b for m, b in self._by_user.get(user, {}).items() if not m.startswith(OLD_HOME_PREFIX)}

    def placed_on(self, backends: set[str]) -> list[tuple[str, str, tuple[str, ...]]]:
        """Every placement (old homes' records too) naming one of *backends*: (user, mailbox, its backends)."""
        self._refresh()
        return sorted((u, m, b) for (u, m), b in self._placements.items() if set(b) & backends)

    async def watch_old_home(self, user: str, backend: str, clock: Any = None) -> None:
        """*backend*'s INBOX is no longer *user*'s: watch it from now (*clock*'s, else the wall clock) for
        OLD_HOME_WATCH seconds (the new record written first, then older ones of that backend
        dropped: a crash between leaves two)."""
        now = clock.seconds() if clock is not None else time.time()
        name = f"{OLD_HOME_PREFIX}{backend}/{int(now) + OLD_HOME_WATCH}"
        await self.place(user, name, [backend])
        for old in self.old_homes(user):
            if old.backend == backend and old.record != name:
                await self.unplace(user, old.record)

    def old_homes(self, user: str | None = None) -> list[OldHome]:
        """The backends whose INBOX a move took elsewhere, still watched (oldhome.py); all users' by default."""
        self._refresh()
        user = None if user is None else self.canonical(user)
        found = []
        named = self._placements if user is None else {(user, m): b for m, b in self._by_user.get(user, {}).items()}
        for (u, m), _b in named.items():
            if m.startswith(OLD_HOME_PREFIX):
                backend, _, until = m[len(OLD_HOME_PREFIX):].rpartition("/")
                if backend and until.isdigit():
                    found.append(OldHome(u, backend, int(until), m))
        return sorted(found, key=lambda h: (h.user, h.backend, h.until))

    # -- moves: the journal and its reservations -------------------------------------------

    def reserved(self, user: str, mailbox: str) -> bool:
        """True while a move holds this mailbox (other commands on it get ``NO [INUSE]``)."""
        self._refresh()
        if not self._held:  # no move holds anything (nearly always): no names to canonicalize
            return False
        name = normalize(mailbox, self.separator)
        return any(not r.shared and covers(r, name, self.separator) for _i, r in self._held.get(self.canonical(user), ()))

    def holders(self, user: str, wanted: Sequence[Reservation]) -> set[int]:
        """The journal entries whose reservations (as this process last saw them) are in the way of *wanted*."""
        self._refresh()
        held = self._held.get(self.canonical(user), ()) if self._held else ()
        if not held:  # nearly always: no names to normalize
            return set()
        names = [Reservation(None if r.name is None else normalize(r.name, self.separator), r.subtree, r.shared)
                 for r in wanted]
        return {i for i, r in held for w in names if conflicts(r, w, self.separator)}

    def mailbox_moves(self, user: str, mailbox: str | None = None) -> set[int]:
        """The journal entries of mailbox moves (mover.py: they hold a private aside name, or the
        whole user) holding names of *user*'s now (*mailbox* among them, if given); from the
        snapshot, no I/O (moveview.py)."""
        self._refresh()
        if not self._held:
            return set()
        held = self._held.get(self.canonical(user), ())
        moves = {i for i, r in held if r.name is None or r.name.startswith(_ASIDE)}
        if mailbox is None or not moves:
            return moves
        name = normalize(mailbox, self.separator)
        return {i for i, r in held if i in moves and not r.shared and covers(r, name, self.separator)}

    async def begin_move(self, user: str, op: str, reservations: Sequence[Reservation], data: dict, *,
                         settle: bool = True) -> JournalEntry:
        """Reserve the names and write the entry, in one store transaction; InUse if any is held.
        *settle* False: other proxies' caches need not have it first (names only begin_move checks)."""
        user = self.canonical(user)
        names = [Reservation(None if r.name is None else normalize(r.name, self.separator), r.subtree, r.shared)
                 for r in reservations]
        sent = self.fences.sending()
        entry_id = await self._store.begin_move(user, op, names, data, self.owner, self.separator)
        self._working.add(entry_id)
        self.fences.renewed([entry_id], sent)
        self._held.setdefault(user, []).extend((entry_id, r) for r in names)
        self._began_entry(user, tuple(names))
        if settle:  # other proxies answer NO [INUSE] from their caches: the move reads nothing before they have it
            await self._store.settle()
        entry = JournalEntry(entry_id, user, op, data, Step.RESERVED, self.owner)
        if self.on_step is not None:
            self.on_step(entry)
        return entry

    async def step(self, entry: JournalEntry, step: Step) -> None:
        """Record that *entry* reached *step* (its data as it is now), durably, then tell the hook."""
        check_transition(entry.step, step)
        await self._write(entry, step)
        entry.step = step
        if self.on_step is not None:
            self.on_step(entry)

    async def record(self, entry: JournalEntry) -> None:
        """Write *entry*'s data as it is now, at the step it is at (more of that step is known)."""
        await self._write(entry, entry.step)
        if self.on_step is not None:
            self.on_step(entry)

    async def _write(self, entry: JournalEntry, step: Step | None) -> None:
        sent = self.fences.sending()
        await self._store.journal_step(entry.id, step, entry.data, entry.owner)
        if entry.owner == self.owner:  # (a journal write of an owned entry renews its lease: pgjournal.py)
            self.fences.renewed([entry.id], sent)

    async def record_before_commit(self, entry: JournalEntry) -> None:
        """:meth:`record`, for a write that a backend's commit follows at once (a batch's hashes before
        its last byte): LostEntry unless the write ended within half a lease of its start. A process
        stalled past its lease (SIGSTOP, a VM paused) may have been taken over by recovery, which found
        no such commit and went on: a commit now would be a second copy of the batch."""
        started = time.monotonic()
        await self.record(entry)
        stalled = time.monotonic() - started
        if self._store.leases and stalled > self._config.lease_seconds * LEASE_MARGIN:
            raise LostEntry(f"journal entry {entry.id}: this process stalled {stalled:.1f} s, past half its "
                            f"{self._config.lease_seconds:g} s lease; recovery may have taken it over")

    async def end_move(self, entry: JournalEntry, *, settle: bool = True) -> None:
        """The operation is over (done or undone): the entry and its reservations go together.

        If the store fails, nobody works on the entry any more: given up, for recovery (renewed,
        its lease would keep it held for good; without leases, it is recovered here)."""
        try:
            await self._store.end_move(entry.id)
        except Exception:
            self._working.discard(entry.id)
            self.fences.forget(entry.id)
            self._given_up.add(entry.id)
            raise
        self._working.discard(entry.id)
        self.fences.forget(entry.id)
        entry.ended = True
        held = self._held.get(entry.user)
        if held:
            rest = [(i, r) for i, r in held if i != entry.id]
            if rest:
                self._held[entry.user] = rest
            else:  # none left: reserved() answers from the empty dict again
                del self._held[entry.user]
        if settle:
            await self._store.settle()  # the names are free for the client's next command, through any proxy

    def abandoned(self, entry: JournalEntry) -> bool:
        """May recovery take *entry* over: unowned, its owner dead or its lease run out, or given up here without a
        lease; never one this process still works on (its lease ran out while the store was away: CI of 69b8dd2)."""
        return (owner_gone(entry.owner) or bool(entry.lease_expired) or self._own_given_up(entry.id, entry.owner)) \
            and not self._at_work(entry.id, entry.owner)

    def _at_work(self, entry_id: int, owner: str | None) -> bool:
        """This process works on the entry: never taken over by its own recovery, whatever its lease says."""
        return owner == self.owner and entry_id in self._working

    def _own_given_up(self, entry_id: int, owner: str | None) -> bool:
        """A store without leases (SQLite): only a lease ends an owner's hold otherwise. A failed
        write of this process's there did not land (one connection, in order): safe to take back."""
        return not self._store.leases and owner == self.owner and entry_id in self._given_up

    async def claim(self, entry: JournalEntry) -> bool:
        """Take over an entry (recovery): only if its owner is still what we read, and gone; then
        *entry* is read again: its owner may have written more steps after our read, before it died
        (a sweep reads every entry, then recovers them one by one: seen, an admin ``move`` read at
        copying, killed at committed while an earlier entry was recovered, then rolled back from the
        stale read, its last batch unknown: the copies kept beside their sources)."""
        sent = self.fences.sending()
        if not await self._store.claim(entry.id, self.owner, entry.owner, dead=owner_gone(entry.owner)):
            return False
        self.fences.renewed([entry.id], sent)
        entry.owner = self.owner
        self._working.add(entry.id)
        self._given_up.discard(entry.id)
        try:
            fresh = next((e for e in await self._store.journal() if e.id == entry.id), None)
        except Exception:
            await self.disown(entry)  # not recovered from a stale read: whoever comes next reads it
            raise
        if fresh is not None:  # ours now: nobody writes it any more
            entry.step, entry.data = fresh.step, fresh.data
        return True

    async def disown(self, entry: JournalEntry) -> None:
        """Leave an unfinished entry to whoever recovers next (this process gave up on it: on_given_up is told).
        Never raises: called on the way out of a failure (the store may be the failure); an entry that could not
        be disowned is recovered once its owner's lease runs out (this process stops renewing it either way)."""
        self._working.discard(entry.id)
        self.fences.forget(entry.id)
        try:
            if await self._store.disown(entry.id, self.owner):
                entry.owner = None
                if self.on_given_up is not None:
                    self.on_given_up()
        except Exception as e:
            self._given_up.add(entry.id)
            log.warn("could not give up journal entry {id} ({why}): recovery takes it once the store answers "
                     "(or its lease runs out)", id=entry.id, why=str(e))

    async def entries(self) -> list[JournalEntry]:
        return await self._store.journal()

    async def owners_gone(self) -> list[int]:
        """The entries whose owner is known gone (dead here, or its lease run out): one read, recovery's quick check.
        Unowned ones (given up) are the sweep's to retry (and RecoverySweep._given_up this process's own)."""
        gone: dict[str, bool] = {}
        return [i for i, owner, expired in await self._store.journal_owners() if owner is not None and (
            expired or self._own_given_up(i, owner) or gone.setdefault(owner, owner_gone(owner)))
            and not self._at_work(i, owner)]

    def start_leases(self, clock: Any, every: float, *, sweeps: bool = True) -> None:
        """Every *every* seconds: renew this process's leases (stores with leases). Without leases a process with no
        sweep of its own (a worker, *sweeps* False) gives up again those a failed write left it owning."""
        if self._renewal is not None or not (self._store.leases or not sweeps):
            return
        self._renewal = task.LoopingCall(lambda: defer.ensureDeferred(self._renew()))
        self._renewal.clock = clock
        self._renewal.start(every, now=False)

    async def _renew(self) -> None:
        try:
            if self._store.leases and self._working:
                sent = self.fences.sending()
                self.fences.renewed(await self._store.renew(self.owner, sorted(self._working)), sent)
            elif not self._store.leases:
                for i in sorted(self._given_up):
                    await self._store.disown(i, self.owner)  # False: ended or taken over since; either way done
                    self._given_up.discard(i)
        except Exception as e:  # StoreUnavailable, mostly: the loop goes on
            log.warn("map store: could not renew this process's move leases or give up its failed moves: {why}",
                     why=str(e))

    async def close(self) -> None:
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        await self._store.close()
