"""A mailbox move waits for a relayed MOVE's turn that a client which stopped reading holds (round h41).

A mailbox move now takes the relayed MOVE turn of each source for its drain and its RENAME aside
(mover.Mover.turn). A relayed MOVE's turn ends at its completion, read from the backend, or when the
backend connection goes (relay._Op.settled). A client that sends ``UID MOVE`` and then stops reading,
its answer bigger than the sockets between hold (here: flag changes another session made, which
Dovecot reports in the MOVE's answer: ~8 MB), has the proxy stop reading that backend (flow.py)
before the tagged OK: the turn stays held for as long as that client stays connected, and the
admin ``move`` of the mailbox waits for it as long (60 s here, then done 2 s after the client
closed; it took 6 s before the move took turns, dc818ce). Dovecot ran that MOVE long ago.
Judged by time and by a census: every message once either way.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from imapwire import Wire
from movecheck import admin_move, census, judge, seed
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")

BOUND = 30.0  # seconds: the move took 6 s with no turns; a bound on a hang, not a measure
KEYWORDS = " ".join("kw%02d" % i + "x" * 44 for i in range(40))  # Dovecot's mail_max_keyword_length: 50


def _stalled_reader(host: str, port: int) -> Wire:
    """A Wire whose receive buffer is small from its connect (it stops reading later)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(120)
    s.connect((host, port))
    w = Wire.__new__(Wire)
    w.sock, w.buf = s, b""
    w.greeting = w.line()
    return w


def _big_answer_move(proxy_factory, fleet, n: int, connect) -> tuple[list[str], object, Wire]:
    """*n* messages in Work (b1); a client (made by *connect*) SELECTs it, another session sets 40 long
    keywords on all of them, and the client sends ``UID MOVE 1 Proj``: its answer carries those changes."""
    mail = [f"w-{i}@t" for i in range(n)]
    seed(fleet["b1"], "carol", "Work", mail, size=300)
    seed(fleet["b1"], "carol", "Proj", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    client = connect(proxy.host, proxy.port)
    client.login("carol")
    assert client.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    with fleet["b1"].client("carol") as m:  # another session: its changes go out with the MOVE's answer
        m.select("Work")
        typ, data = m.store("1:*", "+FLAGS", "(" + KEYWORDS + ")")
        assert typ == "OK", data
    client.send(b"m UID MOVE 1 Proj\r\n")
    return mail, proxy, client


def test_an_admin_move_does_not_wait_for_a_move_whose_answer_its_client_never_reads(proxy_factory, fleet):
    mail, proxy, stalled = _big_answer_move(proxy_factory, fleet, 4000, _stalled_reader)  # and never read again
    time.sleep(2)  # (Dovecot has run it: its answer waits, unread)
    started = time.monotonic()
    mover = admin_move(proxy, "carol", "Work", "b3")
    try:
        out, err = mover.communicate(timeout=BOUND)
        took = time.monotonic() - started
    except subprocess.TimeoutExpired:
        took = None
    stalled.close()
    out, err = mover.communicate(timeout=120)
    counts, where = census(fleet, "carol")
    lost, dup = judge(counts, mail)
    assert (lost, dup) == ([], []), [(i, where.get(i)) for i in lost + dup][:5]
    assert mover.returncode == 0, out + err
    assert took is not None, f"the move still waited after {BOUND:g} s (done once the client closed)"


def test_a_client_that_reads_its_moves_answer_slowly_is_not_cut_off(proxy_factory, fleet):
    """The other side of STALLED_TURN: a client that reads its MOVE's big answer slowly (at most 64 KB
    every 0.25 s: ~4 MB in 15 s or more), its output backed up nearly all the time, still reads on: its
    output drains now and then (flow.ClientOutput.resumes), so the session is not ended."""
    mail, _proxy, slow = _big_answer_move(proxy_factory, fleet, 2000, lambda host, port: Wire(host, port, timeout=120))
    started, got = time.monotonic(), b""
    while not (got.endswith(b"\r\n") and b"\r\nm " in got[-300:]):
        chunk = slow.sock.recv(65536)
        assert chunk, f"cut off after {time.monotonic() - started:.1f} s, {len(got)} bytes read"
        got += chunk
        time.sleep(0.25)
    took = time.monotonic() - started
    assert got[got.rindex(b"\r\nm ") + 2:].startswith(b"m OK"), got[-300:]
    assert took > 12, f"read in {took:.1f} s: not slow enough to test the watch"  # (the setup's own check)
    slow.close()
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], [])
