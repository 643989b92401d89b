"""Costs that must grow linearly with a user's mailboxes, counted (never timed).

A user with thousands of mailboxes (an administrator's real accounts) makes every
per-LIST and per-move step that is quadratic in the mailboxes block the proxy's one
event loop for seconds, for every other user too. Each test counts the calls a step
makes (``sys.setprofile`` sees every C call: ``str.startswith`` and friends) for n and
4n mailboxes and requires the count to grow no faster than the mailboxes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from referral_proxy.config import MapConfig, RuleConfig
from referral_proxy.listing import ListEntry, merge
from referral_proxy.proxyproto import BACKLOG, listen_endpoint
from referral_proxy.routing import MailboxMap
from referral_proxy.store import SQLiteStore


def _count(kind: str, work: Callable[[], object]) -> int:
    """How many *kind* events *work* makes: "c_call" (every C call: str.startswith and friends,
    seen by sys.setprofile) or "line" (Python lines, a loop's body once per pass: sys.settrace)."""
    count = 0

    def hook(_frame: Any, event: str, _arg: object) -> Any:
        nonlocal count
        if event == kind:
            count += 1
        return hook

    setter = sys.setprofile if kind == "c_call" else sys.settrace
    setter(hook)
    try:
        work()
    finally:
        setter(None)
    return count


def _c_calls(work: Callable[[], object]) -> int:
    return _count("c_call", work)


def _entries(n: int) -> list[ListEntry]:
    """n mailboxes, ten under each of n/10 parents, spread over three backends (Dovecot's child flags)."""
    return [ListEntry((b"\\HasNoChildren",), b"/", f"Folder{i // 10}/Sub{i}".encode(), f"b{i % 3}") for i in range(n)]


def _owner(name: str) -> str:
    digits = name.rsplit("Sub", 1)[-1].split("/")[0]
    return f"b{int(digits) % 3}" if digits.isdigit() else "b0"


def test_list_merge_is_linear_in_the_mailboxes() -> None:
    """LIST "" * over 2,000 mailboxes took 5.8 s of the event loop in merge() (each name's
    \\HasChildren found by a startswith() against every other name): 4x the mailboxes must
    cost at most ~4x the calls, not 16x."""
    small = _c_calls(lambda: merge(_entries(250), _owner, "/"))
    large = _c_calls(lambda: merge(_entries(1000), _owner, "/"))
    assert large < 5 * small, (small, large)


def test_list_merge_child_flags_unchanged() -> None:
    """The linear merge says the same child flags as before: a parent placeholder has children,
    a leaf none, a name that is only a prefix of another (Sub1 vs Sub10) is no parent."""
    prefix = [ListEntry((b"\\HasNoChildren",), b"/", b"Folder0/Sub10", "b1")]
    merged = {e.name: e.flags for e in merge(_entries(30) + prefix, _owner, "/")}
    assert merged[b"Folder0"] == (b"\\Noselect", b"\\HasChildren")
    assert merged[b"Folder0/Sub1"] == (b"\\HasNoChildren",)
    extra = [ListEntry((b"\\HasNoChildren",), b"/", b"Folder0/Sub1/Deep", "b1"),
             ListEntry((b"\\HasChildren",), b"/", b"Lone", "b0")]
    merged = {e.name: e.flags for e in merge(_entries(30) + prefix + extra, _owner, "/")}
    assert merged[b"Folder0/Sub1"] == (b"\\HasChildren",)
    assert merged[b"Folder0/Sub10"] == (b"\\HasNoChildren",)
    assert merged[b"Lone"] == (b"\\HasNoChildren",)


def _listened(spec: str) -> Any:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    ports: list[Any] = []
    listen_endpoint(reactor, spec, 5.0).listen(Factory()).addCallback(ports.append)
    assert ports, "listening did not complete at once"
    return ports[0]


def test_client_listeners_queue_a_reconnect_storm() -> None:
    """300 clients of one user connecting at once (a proxy restart, a network blip): with
    Twisted's accept queue of 50 the kernel dropped handshakes, and 12 of 300 clients waited
    for a greeting until their own timeout (bench/bench_sessions.py). Every client listener,
    PROXY-protocol ones and the master's of ``workers`` too (workers.bind_listeners), is made
    with a queue of BACKLOG; one that names its own backlog keeps it."""
    for spec, want in (("tcp:0:interface=127.0.0.1", BACKLOG), ("haproxy:tcp:0:interface=127.0.0.1", BACKLOG),
                       ("tcp:0:interface=127.0.0.1:backlog=7", 7)):
        port = _listened(spec)
        try:
            assert port.backlog == want, spec  # what the port passed to listen(2)
        finally:
            port.stopListening()
    assert BACKLOG >= 511


def _lines(work: Callable[[], object]) -> int:
    return _count("line", work)


def _map_with_others(others: int) -> MailboxMap:
    """carol with three placed mailboxes and an old home, beside *others* users' placements."""
    mailbox_map = MailboxMap(MapConfig(default="b1", rules=(RuleConfig("Far*", ("b2",)),)))

    async def fill() -> None:
        for name, backend in (("Work", "b2"), ("Work/Sub", "b3"), ("Old", "b3")):
            await mailbox_map.place("carol", name, [backend])
        await mailbox_map.watch_old_home("carol", "b3")
        for i in range(others):
            await mailbox_map.place(f"user{i}", f"Box{i}", ["b2"])

    asyncio.run(fill())
    return mailbox_map


def test_a_users_placements_do_not_cost_a_walk_of_everyones() -> None:
    """Every LIST asks which backends may own the user's mailboxes: that walked every user's
    placements (a fleet after a migration holds hundreds of thousands). 100x the other users'
    placements must not cost more lines of Python for carol's questions."""
    def ask(m: MailboxMap) -> None:
        assert m.backends_for("carol") == ["b1", "b2", "b3"]
        assert m.backends_under("carol", "Work") == ["b3", "b1"]
        assert set(m.placements("carol")) == {"Work", "Work/Sub", "Old"}
        assert [h.backend for h in m.old_homes("carol")] == ["b3"]

    few, many = _map_with_others(20), _map_with_others(2000)
    ask(few), ask(many)  # first calls fill caches (a user name's canonical form)
    assert _lines(lambda: ask(many)) <= _lines(lambda: ask(few)) + 10


def test_backends_for_follows_every_change_of_the_map(tmp_path) -> None:
    """backends_for is kept per user: a placement made or dropped here, by another process on the
    same store, or new rules (SIGHUP) must show at once (a stale answer hides mail from a LIST)."""
    config = MapConfig(default="b1")
    here = MailboxMap(config, SQLiteStore(tmp_path / "map.sqlite3"))
    there = MailboxMap(config, SQLiteStore(tmp_path / "map.sqlite3"))
    here.start(), there.start()
    assert here.backends_for("Carol") == ["b1"]
    asyncio.run(here.place("carol", "Work", ["b2"]))
    assert here.backends_for("Carol") == ["b1", "b2"] == here.backends_for("carol")
    asyncio.run(there.place("CAROL", "Far", ["b3"]))
    assert here.backends_for("Carol") == ["b1", "b2", "b3"]
    asyncio.run(there.unplace("carol", "Work"))
    assert here.backends_for("Carol") == ["b1", "b3"]
    here.reconfigure(MapConfig(default="b1", rules=(RuleConfig("*", ("b4",), user="carol"),)))
    assert here.backends_for("Carol") == ["b4", "b3"]
    answer = here.backends_for("Carol")
    answer.append("mine")  # a caller's list is its own
    assert here.backends_for("Carol") == ["b4", "b3"]
