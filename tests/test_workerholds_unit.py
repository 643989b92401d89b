"""workerholds.py without processes: the master's relay of a RENAME's hold between its workers, and
each worker's side (what it holds, for how long, what it says).

The race it prevents, with real Dovecot and a real master: tests/test_rename_stale_lock.py
(``..._at_another_worker``)."""

from __future__ import annotations

import json

from test_rename_hold_unit import _backend, _ctx, _fired, _sent, _session
from twisted.internet import defer
from twisted.internet.task import Clock

from referral_proxy import renamehold
from referral_proxy.renamehold import REMOTE_HOLD, REMOTE_QUIET, hold_others
from referral_proxy.workerholds import ASK_WAIT, MASTER, HoldRelay, WorkerHolds, encode


class _Master:
    """A HoldRelay whose lines to each worker are kept (or handed to that worker's WorkerHolds)."""

    def __init__(self, live: set[int]) -> None:
        self.live = live
        self.to: dict[int, list[dict]] = {i: [] for i in range(MASTER, 4)}
        self.workers: dict[int, WorkerHolds] = {}
        self.relay = HoldRelay(self._send, lambda: sorted(self.live))

    def _send(self, index: int, line: bytes) -> None:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        self.to[index].append(json.loads(line))
        if index in self.workers:
            self.workers[index].received(line)

    def said(self, index: int) -> list[dict]:
        out, self.to[index] = self.to[index], []
        return out


def test_the_master_says_go_once_every_other_live_worker_holds_and_relays_the_end():
    m = _Master({0, 1, 2})
    m.relay.received(0, encode({"hold": "9.1", "backend": "b1", "user": "carol"}))
    asked = {"hold": [0, "9.1"], "backend": "b1", "user": "carol"}
    assert m.said(1) == [asked] and m.said(2) == [asked] and m.said(0) == []
    m.relay.received(1, encode({"held": [0, "9.1"]}))
    assert m.said(0) == []  # worker 2 has not said so yet
    m.relay.received(2, encode({"held": [0, "9.1"]}))
    m.relay.received(2, encode({"held": [0, "9.1"]}))  # (said twice: one go)
    assert m.said(0) == [{"go": "9.1"}]
    m.relay.received(0, encode({"end": "9.1"}))
    assert m.said(1) == [{"end": [0, "9.1"]}] and m.said(2) == [{"end": [0, "9.1"]}]
    assert m.relay.active == {} and m.relay.waiting == {}


def test_a_lone_worker_goes_at_once():
    m = _Master({0})
    m.relay.received(0, encode({"hold": "9.1", "backend": "b1", "user": "carol"}))
    assert m.said(0) == [{"go": "9.1"}]


def test_a_worker_that_dies_is_not_waited_for_and_the_holds_it_asked_for_end():
    m = _Master({0, 1, 2})
    m.relay.received(0, encode({"hold": "9.1", "backend": "b1", "user": "carol"}))
    m.relay.received(1, encode({"hold": "8.1", "backend": "b2", "user": "dave"}))
    m.relay.received(1, encode({"held": [0, "9.1"]}))
    m.said(0), m.said(1), m.said(2)
    m.live.discard(2)
    m.relay.ended(2)  # worker 2 never said it holds: not waited for
    assert m.said(0) == [{"go": "9.1"}]
    m.live.discard(1)
    m.relay.ended(1)  # worker 1 died mid-RENAME: the others' holds for it end
    assert m.said(0) == [{"end": [1, "8.1"]}] and list(m.relay.active) == [(0, "9.1")]


def test_a_worker_started_meanwhile_is_told_the_holds_under_way_and_nobody_waits_for_it():
    m = _Master({0, 1})
    m.relay.received(0, encode({"hold": "9.1", "backend": "b1", "user": "carol"}))
    m.relay.received(1, encode({"held": [0, "9.1"]}))
    assert m.said(0) == [{"go": "9.1"}]
    m.live.add(2)
    m.relay.started(2)
    assert m.said(2) == [{"hold": [0, "9.1"], "backend": "b1", "user": "carol"}]
    m.relay.received(2, encode({"held": [0, "9.1"]}))
    assert m.said(0) == []


def test_lines_in_pieces_odd_names_and_garbage():
    m = _Master({0, 1})
    user = "car\"ol\r\n%*\\\udcff\u00e9"  # a login's 8-bit byte (surrogateescape), CR LF, wildcards
    line = encode({"hold": "9.1", "backend": "b1", "user": user})
    stream = b"not json\n" + b'{"held": 5}\n{"end": null}\n' + line + b"[1, 2]\n"
    for i in range(len(stream)):
        m.relay.received(0, stream[i:i + 1])
    assert m.said(1) == [{"hold": [0, "9.1"], "backend": "b1", "user": user}]
    holds = WorkerHolds(_ctx(Clock()), lambda line: None)
    holds.received(b'{"hold": [1]}\n{"end": 3}\n{"go": []}\n')  # logged, nothing else
    assert holds._holding == {}


def _wired(clock: Clock, *ctxs) -> tuple[_Master, list[WorkerHolds]]:
    """Workers (one ctx each) and their master, every line delivered at once."""
    m = _Master(set(range(len(ctxs))))
    holds = []
    for i, ctx in enumerate(ctxs):
        ctx.worker_holds = WorkerHolds(ctx, lambda line, i=i: m.relay.received(i, line))
        m.workers[i] = ctx.worker_holds
        holds.append(ctx.worker_holds)
    return m, holds


def test_a_rename_holds_the_other_workers_sessions_of_its_user_on_its_backend_until_it_ends():
    clock = Clock()
    own, _ = _backend()
    busy, _ = _backend()
    other_backend, _ = _backend("b2")
    stranger, _ = _backend()
    for conn in (busy, other_backend, stranger):
        conn.command(b"STATUS X (MESSAGES)")
        _sent(conn)
    here = _ctx(clock, _session("carol", {"b1": own}))
    there = _ctx(clock, _session("carol", {"b1": busy, "b2": other_backend}), _session("dave", {"b1": stranger}))
    _wired(clock, here, there)
    held = _fired(defer.ensureDeferred(hold_others(here, "b1", "carol", own)))
    clock.advance(1)
    assert not held  # the other worker's STATUS on b1 is in flight
    busy.dataReceived(b"rp1 OK done\r\n")
    clock.advance(renamehold.POLL)
    assert len(held) == 1 and callable(held[0])
    for conn in (busy, other_backend, stranger):
        conn.command(b"NOOP")
    assert _sent(busy) == b""  # held until the RENAME ends
    assert _sent(other_backend) == b"rp2 NOOP\r\n" and _sent(stranger) == b"rp2 NOOP\r\n"
    held[0]()
    assert _sent(busy) == b"rp2 NOOP\r\n" and there.remote_holds == {}


def test_a_move_the_master_recovers_holds_every_workers_sessions_for_its_rename_aside():
    clock = Clock()
    busy, _ = _backend()
    idle, _ = _backend()
    busy.command(b"STATUS X (MESSAGES)")
    _sent(busy)
    workers = [_ctx(clock, _session("carol", {"b1": busy})), _ctx(clock, _session("carol", {"b1": idle}))]
    m, _ = _wired(clock, *workers)
    master = _ctx(clock)  # no session of its own
    master.worker_holds = m.workers[MASTER] = WorkerHolds(master, lambda line: m.relay.received(MASTER, line))
    held = _fired(defer.ensureDeferred(hold_others(master, "b1", "carol")))
    clock.advance(1)
    assert not held  # worker 0's STATUS is in flight
    busy.dataReceived(b"rp1 OK done\r\n")
    clock.advance(renamehold.POLL)
    assert len(held) == 1
    for conn in (busy, idle):
        conn.command(b"NOOP")
        assert _sent(conn) == b""
    held[0]()
    assert _sent(busy) == b"rp2 NOOP\r\n" and _sent(idle) == b"rp1 NOOP\r\n"
    assert m.relay.active == {} and all(w.remote_holds == {} for w in workers)


def test_the_rename_goes_on_after_ask_wait_without_an_answer_and_ends_once():
    clock = Clock()
    written: list[dict] = []
    ctx = _ctx(clock)
    holds = WorkerHolds(ctx, lambda line: written.append(json.loads(line)))
    got = _fired(defer.ensureDeferred(holds.hold("b1", "carol")))
    assert written[0]["backend"] == "b1" and written[0]["user"] == "carol" and not got
    clock.advance(ASK_WAIT - 0.1)
    assert not got
    clock.advance(0.2)
    assert len(got) == 1 and callable(got[0])  # (logged: renaming regardless)
    got[0]()
    got[0]()
    assert written[1:] == [{"end": written[0]["hold"]}]
    assert not clock.getDelayedCalls()


def test_a_rename_whose_wait_is_cancelled_ends_its_hold():
    clock = Clock()
    written: list[dict] = []
    holds = WorkerHolds(_ctx(clock), lambda line: written.append(json.loads(line)))
    d = defer.ensureDeferred(holds.hold("b1", "carol"))
    d.cancel()
    _fired(d)
    assert written[1:] == [{"end": written[0]["hold"]}] and not clock.getDelayedCalls()


def test_a_hold_for_another_worker_ends_after_remote_hold_and_one_ended_early_holds_nothing():
    clock = Clock()
    busy, _ = _backend()
    busy.command(b"STATUS X (MESSAGES)")
    _sent(busy)
    ctx = _ctx(clock, _session("carol", {"b1": busy}))
    written: list[dict] = []
    holds = WorkerHolds(ctx, lambda line: written.append(json.loads(line)))
    holds.received(encode({"hold": [1, "7.1"], "backend": "b1", "user": "carol"}))
    holds.received(encode({"end": [1, "7.1"]}))  # ended while its STATUS was waited for
    clock.advance(REMOTE_QUIET + 1)
    assert written == [] and ctx.remote_holds == {}
    busy.command(b"NOOP")
    assert _sent(busy) == b"rp2 NOOP\r\n"
    holds.received(encode({"hold": [1, "7.2"], "backend": "b1", "user": "carol"}))
    busy.dataReceived(b"rp1 OK done\r\nrp2 OK done\r\n")
    clock.advance(renamehold.POLL)
    assert written == [{"held": [1, "7.2"]}]
    busy.command(b"NOOP")
    clock.advance(REMOTE_HOLD - 1)
    assert _sent(busy) == b""  # the other worker died mid-RENAME and no end came
    clock.advance(1)
    assert _sent(busy) == b"rp3 NOOP\r\n" and ctx.remote_holds == {}
