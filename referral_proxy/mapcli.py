"""``referral-proxy map``: read and write the placements of the running proxies' map.

A running proxy notices a change at its next lookup (SQLite's data_version), so
``map set`` takes effect for new commands without a restart.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .recovery import describe
from .routing import MailboxMap, open_store

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
    mailbox_map = MailboxMap(config.map, open_store(config.map.store))
    args.user = mailbox_map.canonical(args.user)  # the name the proxy keys everything by
    try:
        if args.map_command == "show":
            print(show(mailbox_map, config, args.user))
        elif args.map_command == "set":
            unknown = [b for b in args.backends if b not in config.backends]
            if unknown:
                sys.stderr.write(f"referral-proxy: map set: unknown backend {unknown[0]!r}\n")
                return 2
            mailbox_map.place(args.user, args.mailbox, args.backends)
            print(f"{args.user} {args.mailbox} -> {', '.join(args.backends)}")
        elif args.map_command == "unset":
            if args.mailbox not in mailbox_map.placements(args.user):
                sys.stderr.write(f"referral-proxy: map unset: {args.user} {args.mailbox} has no placement\n")
                return 1
            mailbox_map.unplace(args.user, args.mailbox)
            print(f"{args.user} {args.mailbox}: placement removed -> {', '.join(mailbox_map.lookup(args.user, args.mailbox).backends)}")
    finally:
        mailbox_map.close()
    return 0


def show(mailbox_map: MailboxMap, config, user: str) -> str:
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
    moves = [e for e in mailbox_map.entries() if e.user == user]
    lines.append("moves in progress:" if moves else "moves in progress: none")
    for entry in moves:
        lines.append(f"  {describe(entry)}" + ("" if entry.owner else " (waiting for recovery)"))
    return "\n".join(lines)
