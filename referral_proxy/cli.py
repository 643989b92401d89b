"""The ``referral-proxy`` command: run the proxy, or a demo with local Dovecot backends."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

from .imap import mutf7

__all__ = ["main", "argv_name", "imap_name"]


def argv_name(arg: str) -> str:
    """A user or mailbox name from the command line as the bytes the shell passed (surrogateescape, as
    auth.py reads LOGIN and the proxy keeps mailbox names: the wire's bytes), as doveadm takes a user.
    Python decodes sys.argv by the locale: in an ISO-8859-1 one, ``j\\xe9r`` came as U+00E9 and was
    written back as UTF-8 (``j\\xc3\\xa9r``, a user nobody is): ``map set`` placed his mailbox for no one,
    ``move`` logged in as no one ("Authorization failed"). In a UTF-8 or C locale nothing changes."""
    return os.fsencode(arg).decode("utf-8", "surrogateescape")


def imap_name(name: str) -> str:
    """A mailbox name typed by an operator as IMAP clients send it: kept if it is modified UTF-7
    already ("Caf&AOk-"), else encoded ("Café", "R&D": "Caf&AOk-", "R&-D"); Dovecot 2.3 knows a
    mailbox by that form only, and a placement of "Café" matched no client's name (probe 5, stop 48).
    A name that is neither (bytes that are not UTF-8), or holds a control character (refused later:
    no client can name it), is kept as typed."""
    if any(c < " " or c == "\x7f" for c in name):
        return name
    try:
        mutf7.decode(name.encode("ascii"))
        return name
    except (UnicodeEncodeError, ValueError):
        pass
    try:
        return mutf7.encode(name).decode("ascii")
    except (UnicodeEncodeError, ValueError):
        return name


def main(argv: Sequence[str] | None = None, *, on_step: Callable[[Any], None] | None = None) -> int:
    """*on_step*: a hook called after each journal step of a move (tests inject faults with it)."""
    parser = argparse.ArgumentParser(prog="referral-proxy", description="IMAP referral proxy")
    parser.add_argument("--config", "-c", help="the TOML configuration file (runs the proxy)")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="start three local Dovecot backends and the proxy in front of them")
    demo.add_argument("--port", type=int, default=1143, help="the proxy's port on 127.0.0.1 (default 1143)")
    demo.add_argument("--dir", help="where to keep the demo's files (default: a new temporary folder)")
    demo.add_argument("--metrics-port", type=int, default=9143,
                      help="the proxy's /metrics and /health on 127.0.0.1 (default 9143; 0 = off)")
    mapp = sub.add_parser("map", help="show or change the mailbox map's run-time placements")
    mapp.add_argument("--config", "-c", dest="map_config", required=True, help="the proxy's TOML configuration file")
    map_sub = mapp.add_subparsers(dest="map_command", required=True)
    map_sub.add_parser("migrate", help="create or update the map store's schema (SQLite files are also brought up to date when opened)")
    show = map_sub.add_parser("show", help="where a user's mailboxes live")
    show.add_argument("user")
    set_ = map_sub.add_parser("set", help="place a mailbox on a backend (replicas after it)")
    set_.add_argument("user")
    set_.add_argument("mailbox")
    set_.add_argument("backends", nargs="+", metavar="backend")
    unset = map_sub.add_parser("unset", help="remove a placement (rules and default apply again)")
    unset.add_argument("user")
    unset.add_argument("mailbox")
    move = sub.add_parser("move", help="move a mailbox (with its children) to another backend, users online")
    move.add_argument("--config", "-c", dest="move_config", required=True)
    move.add_argument("user")
    move.add_argument("mailbox", help='the mailbox (its children go along), or "*" for every mailbox of the user')
    move.add_argument("backend")
    move.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                      help="while another move or a client's RENAME holds a name, try again this long (default 60)")
    recover = sub.add_parser("recover", help="finish or roll back moves a stopped proxy left half done")
    recover.add_argument("--config", "-c", dest="move_config", required=True)
    args = parser.parse_args(argv)
    for name in ("user", "mailbox") if args.command in ("map", "move") else ():
        if getattr(args, name, None) is not None:
            setattr(args, name, argv_name(getattr(args, name)))
    if getattr(args, "mailbox", None) is not None and args.command in ("map", "move"):
        args.mailbox = imap_name(args.mailbox)

    if args.command in ("move", "recover"):
        from .movecli import run_move, run_recover

        return run_move(args, on_step=on_step) if args.command == "move" else run_recover(args, on_step=on_step)
    if args.command == "map":
        from .mapcli import run_map

        return run_map(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(port=args.port, directory=args.dir, metrics_port=args.metrics_port)
    if not args.config:
        parser.error("--config is required to run the proxy")
    from .runner import run

    return run(args.config, on_step=on_step)
