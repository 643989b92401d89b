"""A session that never reads its answers must not hold another session's MOVE of its mailbox: X asks
for every message of Work (30 MB) and, in the same write, a MOVE of one, and reads nothing; Y then moves
another message of Work. On main X's MOVE took the mailbox's turn (turns.py) as soon as it was read and
kept it until its answer, which waited behind the FETCH the proxy could not write: Y's MOVE waited for
ever (stayalive lines only: > 200 s in a probe; no answer in 60 s in this test, 1 of 1 run). Now a
MOVE takes its turn once the session's earlier commands are answered. Judged by Y's answer coming while X still reads nothing, then a census."""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, seed

pytestmark = pytest.mark.usefixtures("clean_mail")

MESSAGES = 100  # of 300 KB: more than the sockets on the way hold


def _tagged_within(w: Wire, tag: bytes, seconds: float) -> bytes | None:
    """The tagged answer to *tag* (untagged lines, stayalive among them, passed over), or None if it
    has not come in *seconds*: a bound far above a MOVE's few milliseconds, so as never to flake."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        w.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            line = w.line()
        except TimeoutError:
            return None
        if line.startswith(tag + b" "):
            return line
    return None


def test_a_client_that_reads_nothing_does_not_hold_another_sessions_move(proxy_factory, fleet):
    ids = [f"w-{k}@t" for k in range(MESSAGES)]
    seed(fleet["b1"], "carol", "Work", ids, size=300_000)
    seed(fleet["b1"], "carol", "A", [])
    proxy = proxy_factory()
    x = Wire(proxy.host, proxy.port, timeout=120)
    x.login("carol")
    assert x.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    x.send(b"f FETCH 1:* BODY.PEEK[]\r\nm UID MOVE 1 A\r\n")
    y = Wire(proxy.host, proxy.port, timeout=120)
    y.login("carol")
    assert y.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    time.sleep(1)  # X's write read by the proxy, its FETCH's answer backed up (on main: X holds the turn)
    y.send(b"m UID MOVE %d A\r\n" % MESSAGES)
    answer = _tagged_within(y, b"m", 60)
    assert answer is not None and answer.startswith(b"m OK"), answer
    x.sock.settimeout(120)
    seen = x.buf  # X reads at last (raw: its FETCH is 30 MB of short lines): its MOVE goes, after Y's
    while b"\r\nm " not in seen[-20000:]:
        chunk = x.sock.recv(1 << 20)
        assert chunk, seen[-300:]
        seen = seen[-20000:] + chunk
    assert seen.split(b"\r\nm ", 1)[1].startswith(b"OK"), seen[-300:]
    counts, where = census(fleet, "carol")
    assert {m: where[m] for m in ids if counts[m] != 1} == {}
    assert sorted(m for m in ids if where[m] == [("b1", "A")]) == sorted([ids[0], ids[-1]])
