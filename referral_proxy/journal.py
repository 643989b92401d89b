"""The move journal as data: its steps, the one table of transitions and recoveries, reservations.

Every operation that removes mail from one backend after putting it on another is
recorded in the map store before it touches anything, step by step, so that a
proxy killed at any point leaves an entry that ``recover`` can finish or undo:

* a mailbox move (cross-server RENAME, the admin ``move``), op ``"move"``;
* a cross-server MOVE / UID MOVE of messages, op ``"move-messages"``;
* a cross-server COPY while its copy lands, op ``"copy-messages"`` (only to hold its names, at
  ``reserved``: transfer._copying);
* a RENAME on one backend, op ``"rename-local"`` (only to hold its names);
* a MULTIAPPEND staged on a backend without MULTIAPPEND, op ``"staging"`` (staging.py):
  its private staging mailbox, which recovery deletes.

Each step names what is done when the entry reaches it, which steps may come right
before it, and what recovery does with an entry a crash left there: ``TABLE``
below (docs/design.md shows it). A move's names are *reserved* in the same store
transaction that creates its entry, and released with the entry's end.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from enum import Enum

from . import lifelock

__all__ = ["Step", "Recovery", "Rule", "TABLE", "Reservation", "InUse", "StoreUnavailable", "LostEntry", "UNAVAILABLE",
           "TAKEN_OVER", "JournalEntry", "check_transition",
           "conflicts", "covers",
           "process_owner", "owner_gone", "pid_namespace"]


class Step(Enum):
    # a mailbox move
    RESERVED = "reserved"  # the entry exists, its names are reserved; nothing read yet
    PLANNED = "planned"  # the (old, new) pairs are known; nothing created
    CREATING = "creating"  # CREATE of pair `at` on the destination sent
    CREATED = "created"  # pair `at`'s mailbox exists on the destination, made by this move
    COPYING = "copying"  # a batch is being appended; the destination's UIDVALIDITY/UIDNEXT before it recorded
    COPIED = "copied"  # that batch is on the destination (UIDs recorded) and verified by content
    COMMITTED = "committed"  # every message of the first pass is verified: the commit point
    SUBSCRIBED = "subscribed"  # subscriptions carried to the destination
    PLACED = "placed"  # the map sends the new names to the destination
    ASIDE = "aside"  # pair `at`'s source renamed to a private name (no delivery reaches it)
    DELTA_COPYING = "delta-copying"  # mail that reached the source during the move: a batch being appended
    DELTA_COPIED = "delta-copied"  # that batch verified on the destination
    DRAINED = "drained"  # pair `at`'s source holds nothing uncopied; expunged, and deleted unless INBOX
    DROPPING = "dropping"  # verified source UIDs (recorded) being moved to a private mailbox (drain.py)
    DROPPED = "dropped"  # those that MOVE took recorded (settled): any other copied one gone was someone else's
    TAKING_BACK = "taking-back"  # copies whose source someone else took away (recorded) being taken back
    # a cross-server MOVE of messages
    MOVE_APPENDING = "move-appending"  # the destination's UIDVALIDITY/UIDNEXT recorded; MULTIAPPEND sent
    MOVE_APPENDED = "move-appended"  # the copies are on the destination, verified; the source UIDs go next
    MOVE_EXPUNGING = "move-expunging"  # the source UIDs still there are flagged \Deleted (recorded): expunge them
    # a RENAME on one backend
    RENAMING = "renaming"  # RENAME sent to the backend; placements follow once it is done
    # a MULTIAPPEND staged (staging.py)
    STAGING = "staging"  # CREATE of the staging mailbox sent: it may exist; the target holds all its messages or none


class Recovery(Enum):
    RELEASE = "release"  # nothing was changed: end the entry, freeing its names
    ROLL_BACK = "roll back"  # remove what this move appended (by UID) and created (if it holds nothing else)
    FINISH = "finish"  # past the commit point: carry what is left, verify, empty and delete the sources
    FINISH_IF_COMMITTED = "finish if the destination committed"  # the batch found by content: finish, else release
    RECONCILE = "reconcile"  # look which name the backend has, let placements follow, release
    DROP_STAGING = "delete the staging mailbox"  # the target is whole either way (one COPY): only it is left


@dataclass(frozen=True)
class Rule:
    """What may come right before a step, and what recovery does with an entry left at it."""

    after: frozenset[Step | None]  # None: the step that begins an entry
    recovery: Recovery


def _rule(after: set[Step | None], recovery: Recovery) -> Rule:
    return Rule(frozenset(after), recovery)


S = Step
TABLE: dict[Step, Rule] = {
    S.RESERVED: _rule({None}, Recovery.RELEASE),
    S.PLANNED: _rule({S.RESERVED}, Recovery.RELEASE),
    S.CREATING: _rule({S.PLANNED, S.CREATED, S.COPIED}, Recovery.ROLL_BACK),
    S.CREATED: _rule({S.CREATING}, Recovery.ROLL_BACK),
    S.COPYING: _rule({S.PLANNED, S.CREATED, S.COPIED}, Recovery.ROLL_BACK),
    S.COPIED: _rule({S.COPYING}, Recovery.ROLL_BACK),
    S.COMMITTED: _rule({S.PLANNED, S.CREATED, S.COPIED}, Recovery.FINISH),
    S.SUBSCRIBED: _rule({S.COMMITTED}, Recovery.FINISH),
    S.PLACED: _rule({S.SUBSCRIBED}, Recovery.FINISH),
    S.ASIDE: _rule({S.PLACED, S.DELTA_COPIED, S.DRAINED, S.DROPPED, S.TAKING_BACK}, Recovery.FINISH),
    S.DELTA_COPYING: _rule({S.PLACED, S.ASIDE, S.DELTA_COPYING, S.DELTA_COPIED, S.DRAINED, S.DROPPED, S.TAKING_BACK},
                           Recovery.FINISH),
    S.DELTA_COPIED: _rule({S.DELTA_COPYING}, Recovery.FINISH),
    S.DRAINED: _rule({S.PLACED, S.ASIDE, S.DELTA_COPIED, S.DRAINED, S.DROPPED, S.TAKING_BACK}, Recovery.FINISH),
    S.DROPPING: _rule({S.PLACED, S.ASIDE, S.DELTA_COPIED, S.DRAINED, S.DROPPED, S.TAKING_BACK}, Recovery.FINISH),
    S.DROPPED: _rule({S.DROPPING}, Recovery.FINISH),
    S.TAKING_BACK: _rule({S.PLACED, S.ASIDE, S.DELTA_COPIED, S.DRAINED, S.DROPPED, S.TAKING_BACK}, Recovery.FINISH),
    S.MOVE_APPENDING: _rule({S.RESERVED}, Recovery.FINISH_IF_COMMITTED),
    S.MOVE_APPENDED: _rule({S.MOVE_APPENDING}, Recovery.FINISH),
    S.MOVE_EXPUNGING: _rule({S.MOVE_APPENDED, S.MOVE_APPENDING}, Recovery.FINISH),  # APPENDING: recovery found the copies
    S.RENAMING: _rule({S.RESERVED}, Recovery.RECONCILE),
    S.STAGING: _rule({S.RESERVED}, Recovery.DROP_STAGING),
}
del S


def check_transition(before: Step | None, after: Step) -> None:
    """Raise if the table does not allow *after* right after *before* (a programming error)."""
    if before not in TABLE[after].after:
        raise ValueError(f"journal: {after.value} cannot follow {before.value if before else 'the start'}")


@dataclass(frozen=True)
class Reservation:
    """A name a move holds. *subtree*: its children too. *name* None: every mailbox of the user.

    A *shared* reservation (a cross-server MOVE pins its two mailboxes) conflicts only with
    exclusive ones; only exclusive ones make other commands answer ``NO [INUSE]``."""

    name: str | None
    subtree: bool = True
    shared: bool = False


def covers(r: Reservation, name: str, separator: str) -> bool:
    """Is the (canonical) mailbox *name* inside *r*?"""
    if r.name is None:
        return True
    return name == r.name or (r.subtree and name.startswith(r.name + separator))


def conflicts(a: Reservation, b: Reservation, separator: str) -> bool:
    """Two reservations of one user that cannot be held at once."""
    if a.shared and b.shared:
        return False
    if a.name is None or b.name is None:
        return True
    return covers(a, b.name, separator) or covers(b, a.name, separator)


class InUse(Exception):
    """Another operation holds one of the names (``NO [INUSE]``); *held*: the reservations in the way."""

    def __init__(self, held: list[Reservation]) -> None:
        super().__init__(f"held: {', '.join(str(r.name) for r in held)}")
        self.held = held


class StoreUnavailable(Exception):
    """The map store cannot be reached (PostgreSQL down, a timeout): nothing was written.

    Routing goes on from the cache; moves and ``map set`` are refused until it is back."""


#: Any command that must write the map (a move, a RENAME or CREATE or DELETE that places or unplaces): probe j1 F3.
UNAVAILABLE = "[UNAVAILABLE] The mailbox map is unreachable; commands that change where mailboxes live wait until it is back"
TAKEN_OVER = ("[UNAVAILABLE] This proxy stalled past its lease and recovery took the operation over; "
              "it is finished or undone there: look again shortly")


class LostEntry(Exception):
    """A journal write found the entry owned by another process (its lease ran out and it was
    taken over by recovery) or gone: this process must stop working on it."""


@dataclass
class JournalEntry:
    """An operation in progress, as the store keeps it: *data* is JSON; each step writes what changed (journalrows.py)."""

    id: int
    user: str
    op: str
    data: dict
    step: Step
    owner: str | None = None  # "host:pid:start" of the process running it; None: anyone may recover it
    created: float = field(default_factory=time.time)
    ended: bool = False  # removed from the store (done or undone)
    lease_expired: bool | None = None  # stores with leases: the owner stopped renewing it (None: no leases)


def _start_time(pid: int) -> str:
    """The kernel's start time of *pid* (Linux), so a reused pid is not taken for its owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "?"


def pid_namespace() -> str:
    """This process's PID namespace (Linux): a pid means a process only within it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


_OWNER: dict[int, str] = {}  # pid -> its owner id (worked out once per process: a fork, twistd's daemon, has its own)


def process_owner() -> str:
    """``host:pid:start:pidns``: who runs an entry (a move in this process). Asked each time, never kept
    from before a fork: twistd made the service, then forked its daemon, whose entries named the
    launcher's pid, dead: its own recovery took its live moves over, mail lost (probe w2, stop 52)."""
    pid = os.getpid()
    if (owner := _OWNER.get(pid)) is None:
        owner = _OWNER[pid] = f"{socket.gethostname()}:{pid}:{_start_time(pid)}:{pid_namespace()}"
    return owner


def owner_gone(owner: str | None) -> bool:
    """True if the process that owned an entry no longer runs (on this host): it may be recovered.

    An owner on another host, or in another PID namespace (a container with the host's network and
    name: its pid is none or another process here; probe v5 of stop 52, its live RENAME recovered
    under it, mail lost), is never taken for gone by this test: a shared store across hosts has
    leases (JournalEntry.lease_expired), the SQLite file its owners' locks (store.LifeLocks)."""
    if owner is None:
        return True
    host, _, rest = owner.partition(":")
    pid_s, _, rest = rest.partition(":")
    start, _, namespace = rest.partition(":")  # (no namespace: written by an older version, on this host's)
    if (alive := lifelock.alive(owner)) is not None:  # its lock says, wherever it ran on this machine
        return not alive
    if host != socket.gethostname() or not pid_s.isdigit() or namespace not in ("", pid_namespace()):
        return False
    pid = int(pid_s)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    now = _start_time(pid)  # ("?": /proc unreadable, hidepid: a pid that runs is not taken for a reused one)
    return "?" not in (start, now) and start != now
