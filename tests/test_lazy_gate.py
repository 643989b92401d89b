"""A login or a task pauses the client's socket only once the client sends more meanwhile
(flow.LAZY): a client that waits for its answer costs no pause and resume (two epoll_ctl
calls); one that sends on is paused after that read, and what it sent is served in order
once the answer is out. Back-pressure reasons still pause at once."""

from __future__ import annotations

from typing import Any

from referral_proxy.flow import Block
from referral_proxy.testing.fakes import HeldConnector, NoDelayTransport, SessionHarness


class _Counting(NoDelayTransport):
    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.pauses += 1
        super().pauseProducing()


def _harness() -> tuple[SessionHarness, HeldConnector, Any]:
    connector = HeldConnector()
    client = _Counting()
    h = SessionHarness(connector=connector, client=client)
    h.to_client()
    return h, connector, client


def test_a_login_the_client_waits_for_pauses_nothing() -> None:
    h, connector, client = _harness()
    h.send(b"L LOGIN alice secret\r\n")
    assert Block.LOGIN in h.session.flow.blocked
    assert client.producerState == "producing" and client.pauses == 0
    connector.held.pop().callback(None)
    h.turns()
    assert h.to_client().startswith(b"L OK [CAPABILITY ")
    assert client.producerState == "producing" and client.pauses == 0


def test_bytes_sent_during_a_login_pause_the_socket_and_are_served_after_it() -> None:
    h, connector, client = _harness()
    h.send(b"L LOGIN alice secret\r\n")
    assert client.pauses == 0
    h.send(b"n1 NOOP\r\n")
    assert client.producerState == "paused" and client.pauses == 1
    h.send(b"n2 NOOP\r\n")  # what a read already under way brings: kept, still paused
    assert client.producerState == "paused" and client.pauses == 1
    assert h.to_client() == b""
    connector.held.pop().callback(None)
    h.turns()
    out = h.to_client()
    assert out.startswith(b"L OK [CAPABILITY ")
    assert h.to_backend() == b"rp1 NOOP\r\nrp2 NOOP\r\n"  # served in order once the login is answered
    h.from_backend(b"rp1 OK NOOP completed.\r\nrp2 OK NOOP completed.\r\n")
    assert h.to_client() == b"n1 OK NOOP completed.\r\nn2 OK NOOP completed.\r\n"
    assert client.producerState == "producing"


def test_back_pressure_during_a_login_pauses_at_once_and_resumes_once_both_end() -> None:
    h, connector, client = _harness()
    h.send(b"L LOGIN alice secret\r\n")
    gate = h.session.flow.gate
    gate.pause("backend:b1")  # a backend's full socket: at once
    assert client.producerState == "paused" and client.pauses == 1
    connector.held.pop().callback(None)
    h.turns()
    assert h.to_client().startswith(b"L OK [CAPABILITY ")
    assert client.producerState == "paused"  # the back-pressure still holds
    gate.resume("backend:b1")
    assert client.producerState == "producing"
