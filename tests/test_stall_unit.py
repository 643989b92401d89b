"""stall.Watch with a fake clock: a connection that owes an answer and moves no byte for T seconds
while the proxy reads it is cut; a read, a write, the proxy's own pause restart the clock; a relayed
read is watched only while it is alone in flight (another command may write) and until answered."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from referral_proxy.backend import BackendProtocol, BackendUnavailable
from referral_proxy.config import BackendConfig
from referral_proxy.stall import Watch

T = 60.0


class _Transport:
    def __init__(self) -> None:
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


class _Conn:
    name = "b2"

    def __init__(self) -> None:
        self.bytes_in = self.bytes_out = 0
        self.closed = self.stalled = False
        self.transport = _Transport()
        self._pending: dict[bytes, Any] = {b"rp1": None}


def run(clock: Clock, seconds: float) -> None:
    """Time passes, a second at a time (the watch looks every T/4)."""
    clock.pump([1.0] * int(seconds))


def _watch(clock: Clock, conn: _Conn, paused: list[bool] | None = None, tag: bytes | None = None) -> Watch:
    flag = paused if paused is not None else [False]
    return Watch(clock, conn, T, "LIST", tag, lambda _clock, _conn: not flag[0])


def test_silence_for_t_seconds_cuts_the_connection():
    clock, conn = Clock(), _Conn()
    _watch(clock, conn)
    run(clock, T - 1)
    assert conn.transport.aborted == 0
    run(clock, T // 4 + 1)
    assert conn.transport.aborted == 1 and conn.stalled


@pytest.mark.parametrize("side", ["bytes_in", "bytes_out"])
def test_a_byte_every_half_t_either_way_is_never_cut(side):
    clock, conn = Clock(), _Conn()
    _watch(clock, conn)
    for _ in range(40):
        run(clock, T / 2)
        setattr(conn, side, getattr(conn, side) + 1)
    assert conn.transport.aborted == 0
    run(clock, 2 * T)
    assert conn.transport.aborted == 1


def test_time_the_proxy_paused_its_reading_does_not_count():
    clock, conn, paused = Clock(), _Conn(), [True]
    _watch(clock, conn, paused)
    run(clock, 10 * T)  # back-pressure: the backend cannot send what nobody reads
    assert conn.transport.aborted == 0
    paused[0] = False
    run(clock, T / 2)
    assert conn.transport.aborted == 0
    run(clock, T)
    assert conn.transport.aborted == 1


def test_cancelled_and_lost_watches_stop():
    clock, conn = Clock(), _Conn()
    w = _watch(clock, conn)
    w.cancel()
    assert not w.active and clock.getDelayedCalls() == []
    lost = _Conn()
    _watch(clock, lost)
    lost.closed = True
    run(clock, 3 * T)
    assert lost.transport.aborted == 0 and clock.getDelayedCalls() == []


def test_a_relayed_read_is_watched_alone_and_until_answered():
    clock, conn = Clock(), _Conn()
    _watch(clock, conn, tag=b"rp1")
    conn._pending[b"rp2"] = None  # another command in flight (it may write): never cut
    run(clock, 5 * T)
    assert conn.transport.aborted == 0
    del conn._pending[b"rp1"]  # answered: the watch ends by itself
    run(clock, 5 * T)
    assert conn.transport.aborted == 0 and clock.getDelayedCalls() == []


class _Aborting(StringTransport):
    def __init__(self, proto: BackendProtocol) -> None:
        super().__init__()
        self.proto = proto

    def abortConnection(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("aborted")))


def _connected(seconds: float = T) -> tuple[Clock, BackendProtocol]:
    clock = Clock()
    proto = BackendProtocol(BackendConfig("b2", "tcp:127.0.0.1:1", "imap://b2", answer_timeout=seconds))
    proto.clock = clock
    proto.makeConnection(_Aborting(proto))
    proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
    return clock, proto


def test_a_bounded_command_fails_as_unavailable_and_an_unbounded_one_waits():
    clock, proto = _connected()
    waits = proto.command(b"COPY 1 X")
    run(clock, 10 * T)
    assert not waits.called  # a write: never cut (its commit could be in doubt)
    proto.dataReceived(b"rp1 OK done\r\n")
    errors: list[Failure] = []
    proto.command(b'LIST "" "*"', bounded=True).addErrback(errors.append)
    run(clock, T / 2)
    proto.dataReceived(b'* LIST () "/" INBOX\r\n')  # progress
    run(clock, T)
    assert not errors
    run(clock, T / 2)
    assert errors and errors[0].check(BackendUnavailable) and "sent no answer for 60s" in str(errors[0].value)
    assert proto.closed and clock.getDelayedCalls() == []


def test_answer_timeout_zero_never_cuts():
    clock, proto = _connected(0)
    d = proto.command(b'LIST "" "*"', bounded=True)
    run(clock, 100 * T)
    assert not d.called and clock.getDelayedCalls() == []
