"""``referral-proxy map``: read and write the placements of the running proxies' map; migrate its schema.

A running proxy learns of a change at once (PostgreSQL: LISTEN/NOTIFY; SQLite: its
data_version, at the next lookup), so ``map set`` takes effect for new commands
without a restart. With the store unreachable, ``set``/``unset`` fail and change nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import ConfigError, load_config
from .imap.mutf7 import shifts_a_line_break
from .journal import InUse, Reservation, StoreUnavailable
from .movecli import _run, master_login, missing_store, unnamable
from .openstore import open_store
from .recovery import describe
from .routing import MailboxMap, normalize
from .store import SQLiteStore

__all__ = ["run_map"]


def run_map(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.map_config)
    except ConfigError as e:
        sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
        return 2
    if config.map.store is None:
        sys.stderr.write("referral-proxy: map: [map].store is not set: there is nowhere to keep placements\n")
        return 2
    if args.map_command == "migrate":
        return _migrate(config.map.store)
    if (why := missing_store(config.map.store)) is not None:
        sys.stderr.write(f"referral-proxy: map: {why}\n")
        return 2
    if (why := master_login(args.user, config.map.master_user_separator)) is not None:
        sys.stderr.write(f"referral-proxy: map {args.map_command}: {args.user!r} {why}\n")
        return 2
    store = open_store(config.map.store, lease_seconds=config.map.lease_seconds)
    mailbox_map = MailboxMap(config.map, store)
    try:
        mailbox_map.start()
    except Exception as e:  # StoreUnavailable, SchemaError: one line
        sys.stderr.write(f"referral-proxy: map: {e}\n")
        return 1
    args.user = mailbox_map.canonical(args.user)  # the name the proxy keys everything by

    async def main(reactor: Any) -> int:
        try:
            return await _command(args, config, mailbox_map)
        except StoreUnavailable as e:
            sys.stderr.write(f"referral-proxy: map {args.map_command}: the map store is unreachable, nothing "
                             f"changed: {e}\n")
            return 1
        finally:
            await mailbox_map.close()

    return _run(main)


def _migrate(spec: str) -> int:
    """PostgreSQL: by this command only. SQLite: every process opening the file migrates it
    (the embedded default is never migrated by hand); this command does it now and says so."""
    if not spec.startswith(("postgresql:", "postgres:")):
        try:
            store = SQLiteStore(spec.partition(":")[2])
            store.start()
        except Exception as e:  # SchemaError (a newer file), sqlite3.Error (not a database, no access)
            sys.stderr.write(f"referral-proxy: map migrate: {e}\n")
            return 1
        print(store.migrated)
        return 0
    from .pgstore import migrate

    try:
        print(migrate(spec))
    except Exception as e:
        sys.stderr.write(f"referral-proxy: map migrate: {e}\n")
        return 1
    return 0


async def _command(args: argparse.Namespace, config: Any, mailbox_map: MailboxMap) -> int:
    if args.map_command == "show":
        print(await show(mailbox_map, config, args.user))
    elif args.map_command == "set":
        unknown = [b for b in args.backends if b not in config.backends]
        if unknown:
            sys.stderr.write(f"referral-proxy: map set: unknown backend {unknown[0]!r}\n")
            return 2
        if len(set(args.backends)) < len(args.backends):  # as a rule's list (config.py): a typo, no replica
            sys.stderr.write(f"referral-proxy: map set: a backend is named twice: {' '.join(args.backends)}\n")
            return 2
        named = args.mailbox.encode("utf-8", "surrogateescape")  # no client could ever name it (grammar.is_mailbox)
        if not args.mailbox or any(c in args.mailbox for c in "\r\n\0") or shifts_a_line_break(named):
            sys.stderr.write(f"referral-proxy: map set: not a mailbox name: {args.mailbox!r}\n")
            return 2
        if why := unnamable(args.mailbox, mailbox_map.separator):
            sys.stderr.write(f"referral-proxy: map set: {args.mailbox!r} {why}: no mailbox is named so\n")
            return 2

        before = mailbox_map.lookup(args.user, args.mailbox).backends

        async def place() -> int:
            await mailbox_map.place(args.user, args.mailbox, args.backends)
            return 0

        if await _unless_held(mailbox_map, args.user, args.mailbox, "set", place):
            return 1
        await mailbox_map.store.settle()  # the running proxies have it when this command returns
        print(f"{args.user} {args.mailbox} -> {', '.join(args.backends)}")
        if list(before) != list(args.backends):  # probe m4 of stop 61: mail on the old backend hidden, not a word
            sys.stderr.write(f"referral-proxy: map set: note: no mail moves with a placement: whatever {args.mailbox!r} "
                             f"holds on {', '.join(before)} is out of clients' reach while the name routes to "
                             f"{', '.join(args.backends)} (`referral-proxy move` moves a mailbox with its mail)\n")
        if any(c in args.mailbox for c in "*%"):  # a legal name, but an operator may have meant a rule
            sys.stderr.write(f"referral-proxy: map set: note: {args.mailbox!r} was placed as one mailbox's name, "
                             f"not as a pattern (patterns are [[map.rules]] in the configuration)\n")
    elif args.map_command == "unset":
        async def unplace() -> int:
            if normalize(args.mailbox, mailbox_map.separator) not in mailbox_map.placements(args.user):  # inbox: INBOX
                sys.stderr.write(f"referral-proxy: map unset: {args.user} {args.mailbox} has no placement\n")
                return 1
            await mailbox_map.unplace(args.user, args.mailbox)
            return 0

        if await _unless_held(mailbox_map, args.user, args.mailbox, "unset", unplace):
            return 1
        await mailbox_map.store.settle()
        print(f"{args.user} {args.mailbox}: placement removed -> "
              f"{', '.join(mailbox_map.lookup(args.user, args.mailbox).backends)}")
    return 0


async def _unless_held(mailbox_map: MailboxMap, user: str, mailbox: str, command: str,
                       change: Callable[[], Awaitable[int]]) -> int:
    """*change()*, refused (1) while a running move holds the name, as a client's command on it is
    (NO [INUSE]): the move writes its own placements at its end, and one set meanwhile either was
    overwritten or (set after the move placed the new name) sent the name where its mail is not
    (seen: `map set carol Shared/Work b2` at a RENAME's 'placed' step left its 20 messages on b3
    unreachable). The name is reserved (shared: clients go on) in the store's one transaction that
    checks it, for as long as the change: a move that begins between a check and the write cannot be."""
    try:
        entry = await mailbox_map.begin_move(user, "map", [Reservation(mailbox, subtree=False, shared=True)],
                                             {"mailbox": mailbox, "command": command})
    except InUse:
        sys.stderr.write(f"referral-proxy: map {command}: {user} {mailbox} is held by a move in progress (`map "
                         f"show {user}`); nothing changed: try again once it is over\n")
        return 1
    try:
        return await change()
    finally:
        await mailbox_map.end_move(entry)


async def show(mailbox_map: MailboxMap, config: Any, user: str) -> str:
    """A readable account of where *user*'s mailboxes live, in order of authority."""
    lines = [f"user {user}: home {', '.join(mailbox_map.home(user).backends)}"]
    placements = mailbox_map.placements(user)
    lines.append("placements:" if placements else "placements: none")
    for mailbox, backends in sorted(placements.items()):
        lines.append(f"  {mailbox} -> {', '.join(backends)}")
    rules = [r for r in config.map.rules if r.user is None or mailbox_map.canonical(r.user) == user]
    lines.append("rules:" if rules else "rules: none")
    for r in rules:
        lines.append(f"  {r.mailbox} -> {', '.join(r.backends)}" + ("" if r.user is None else f"   (user {r.user})"))
    lines.append(f"default -> {config.map.default}")
    lines.append(f"backends holding mail: {', '.join(mailbox_map.backends_for(user))}")
    home = mailbox_map.home(user).backends
    for old in mailbox_map.old_homes(user):  # oldhome.py (the home itself again: dropped at the next sweep)
        if old.backend in home:
            continue
        lines.append(f"old home {old.backend}: mail delivered to its INBOX is carried to the home until "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(old.until))}")
    moves = [e for e in await mailbox_map.entries() if e.user == user]
    lines.append("moves in progress:" if moves else "moves in progress: none")
    for entry in moves:
        lines.append(f"  {describe(entry)}" + ("" if entry.owner else " (waiting for recovery)"))
    return "\n".join(lines)
