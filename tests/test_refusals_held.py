"""The proxy's own refusals of commands pipelined behind an APPEND wait for its answer (RFC 3501
5.5: answers in the commands' order, test_refusals_in_order.py). While one waits, no further
command is read: a client that pipelines thousands of refused commands behind an APPEND its
backend is slow to answer makes the proxy hold one answer, not thousands (the rest stay unread
in the client's socket, as with any blocked input)."""

from __future__ import annotations

import pytest

from referral_proxy.flow import Block
from referral_proxy.testing.fakes import SessionHarness

N = 2000


@pytest.mark.parametrize("refused", [b"b%d FROBNICATE\r\n",  # a parse refusal (BAD)
                                     b"b%d STATUS referral-proxy-staging-x (MESSAGES)\r\n"])  # a NO of ours
def test_refusals_behind_an_unanswered_append_are_held_one_at_a_time_and_all_answered_in_order(refused):
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND INBOX {3+}\r\nabc\r\n" + b"".join(refused % i for i in range(N)))
    assert h.to_backend().startswith(b"rp1 APPEND INBOX {3+}\r\nabc\r\n")
    assert h.to_client() == b""  # everything waits for the APPEND's answer
    assert len(h.session.appends._after) == 1  # one refusal held; the next commands not read
    assert Block.HELD in h.session.flow.blocked
    h.from_backend(b"rp1 OK [APPENDUID 7 1] done\r\n")
    h.turns()
    out = h.to_client()
    lines = out.splitlines()
    assert lines[0] == b"a OK [APPENDUID 7 1] done"
    assert [line.split()[0] for line in lines[1:]] == [b"b%d" % i for i in range(N)]
    assert all(b" NO " in line or b" BAD " in line for line in lines[1:])
    assert not h.session.flow.blocked
    h.send(b"c NOOP\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"
