"""Pipelined LOGINs under the failed-login penalty: whatever the reads, each login is
answered in order, the socket is paused while a login is checked or waits out its penalty
and read again after it, a login waiting is never cut or freed, and a client that leaves
meanwhile ends cleanly. In memory, the penalty's timer on a MemoryReactorClock; the same
interleavings as tests/test_limits_dovecot.py and test_login_wait_dovecot.py on real sockets."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from referral_proxy.backend import AuthenticationFailed, BackendProtocol, Credentials, Tagged
from referral_proxy.flow import Block
from referral_proxy.imap.response import parse_response_start
from referral_proxy.testing.fakes import FakeConnector, NoDelayTransport, SessionHarness, minimal_config

THREE = b'a LOGIN alice wrong1\r\nb LOGIN alice wrong2\r\nc LOGIN alice secret\r\n'


class _Checking(FakeConnector):
    """Refuses any password but "secret", as a backend would."""

    async def __call__(self, config: Any, credentials: Credentials) -> BackendProtocol:
        if credentials.password != "secret":
            raw = b"rp1 NO [AUTHENTICATIONFAILED] Authentication failed."
            raise AuthenticationFailed(Tagged(parse_response_start(raw), raw))
        return await super().__call__(config, credentials)


def _harness() -> SessionHarness:
    h = SessionHarness(minimal_config(login_penalty=1), connector=_Checking(), client=NoDelayTransport())
    h.to_client()  # the greeting
    return h


def _tagged(out: bytes) -> list[bytes]:
    return [line.split(b" ")[0] + b" " + line.split(b" ")[1] for line in out.split(b"\r\n")
            if line and not line.startswith((b"*", b"+"))]


def _wait_out(h: SessionHarness, seconds: float = 1.0) -> bytes:
    h.reactor.advance(seconds)
    h.turns()
    return h.to_client()


@pytest.mark.parametrize("how", ["one write", "one byte at a time", "two reads"])
def test_pipelined_logins_waiting_out_the_penalty_are_answered_in_order(how: str) -> None:
    h = _harness()
    if how == "two reads":
        h.send(THREE[:30])
        h.send(THREE[30:])
    else:
        h.send(THREE, one_byte_at_a_time=how == "one byte at a time")
    out = h.to_client()
    assert _tagged(out) == [b"a NO"]  # b waits its penalty (1 s)
    assert Block.LOGIN in h.session.flow.blocked
    assert h.client.producerState == "paused"  # b's login holds the socket
    out = _wait_out(h)
    assert _tagged(out) == [b"b NO"]
    out = _wait_out(h)
    assert _tagged(out) == [b"c OK"]
    assert not h.session.flow.blocked and h.client.producerState == "producing"
    assert h.session.ctx.observer.login_delays_total == 2
    h.send(b"z LOGOUT\r\n")
    assert b"z OK" in h.to_client()


def test_bytes_arriving_during_the_penalty_wait_are_served_after_it() -> None:
    h = _harness()
    h.send(b"a LOGIN alice wrong1\r\n")
    assert _tagged(h.to_client()) == [b"a NO"]
    h.send(b"b LOGIN alice secret\r\n")  # waits 1 s
    assert h.to_client() == b"" and h.client.producerState == "paused"
    h.send(b"n NOOP\r\n", one_byte_at_a_time=True)  # what reads under way still bring: kept, not run
    assert h.client.producerState == "paused" and h.connector.backends == []  # not even tried yet
    out = _wait_out(h)
    assert _tagged(out) == [b"b OK"]
    assert h.to_backend() == b"rp1 NOOP\r\n"
    h.from_backend(b"rp1 OK NOOP completed.\r\n")
    assert h.to_client() == b"n OK NOOP completed.\r\n"
    assert h.client.producerState == "producing"


@pytest.mark.parametrize("when", ["during the wait", "after the bytes behind it"])
def test_a_client_that_leaves_during_the_penalty_wait_ends_cleanly(when: str) -> None:
    h = _harness()
    h.send(b"a LOGIN alice wrong1\r\n")
    h.to_client()
    h.send(b"b LOGIN alice secret\r\n")
    if when == "after the bytes behind it":
        h.send(b"n NOOP\r\nz LOGOUT\r\n")
    session = h.session
    assert Block.LOGIN in session.flow.blocked
    session.connectionLost(None)  # EOF (the client closed) while b waits
    assert session.flow is not None  # not freed under a login under way (teardown.quiet)
    h.reactor.advance(1)
    h.turns()
    assert h.to_client() == b""  # nothing answered to a client that left
    assert h.connector.backends == []  # the login was not even tried after its wait
    assert not h.reactor.getDelayedCalls() or all(not c.active() for c in h.reactor.getDelayedCalls())
    session.connectionLost(None)  # a second one: nothing
    gc.collect()
